"""How good a labelling run's labels are: its stored masks against reviewed annotations of the same images (matched
by image URI), scored like a model (:mod:`pipelines.metrics`). No model and no GPU: the masks are in the run.

A run's class is matched to a reviewed class by name. A pixel the run left unlabelled (below its confidence
threshold), or gave a class the review does not have, counts as predicted ``UNLABELLED``: it lowers the recall of
the pixel's reviewed class and is no class's false positive. Reviewed images the run has no row for (or only an
error row) are listed as unmatched in the report; they do not count.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.annotations import ReviewedSet
from pipelines.evaluation.report import EvaluationResult
from pipelines.images import IGNORE_ID
from pipelines.label_output import LabelOutput
from pipelines.label_queries import labels_connection
from pipelines.masks import class_id_lookup, decode_mask_png
from pipelines.metrics import compute_metrics, confusion_matrix
from pipelines.pairs import IGNORE_INDEX

UNLABELLED = "(unlabelled by the run)"  # the report's extra column; never ground truth, so never in a mean
MAX_LISTED = 100


def evaluate_labels(run_uri: str, reviewed: ReviewedSet, benchmark: str = "labels") -> EvaluationResult:
    """Per-class IoU of the run's masks on the reviewed images it labelled; ``benchmark`` names the report
    (``evaluation_<benchmark>.json``)."""
    started = time.perf_counter()
    run = LabelOutput.existing(run_uri)
    manifest, run_names = run.read_vocabulary()
    names = list(reviewed.class_names)
    lookup = class_id_lookup(run_names, names, len(names), np.int64)  # run class -> reviewed id, else UNLABELLED
    wanted = {image.image_uri: image for image in reviewed.images}
    confusion = np.zeros((len(names) + 1, len(names) + 1), dtype=np.int64)
    matched: set[str] = set()
    mismatched: set[str] = set()
    errors: list[dict[str, str]] = []
    pixels = 0
    with labels_connection(run) as connection:
        connection.register("reviewed", pa.table({"source_uri": pa.array(list(wanted), pa.string())}))
        reader = connection.sql(
            "SELECT source_uri, mask_png FROM labels JOIN reviewed USING (source_uri) WHERE error IS NULL"
        ).to_arrow_reader(batch_size=64)
        for batch in reader:
            for uri, mask_png in zip(batch["source_uri"].to_pylist(), batch["mask_png"].to_pylist(), strict=True):
                image = wanted[uri]
                label = np.where(image.label == IGNORE_INDEX, IGNORE_ID, image.label).astype(np.uint16)
                prediction = lookup[decode_mask_png(mask_png)]
                if prediction.shape != label.shape:
                    sizes = f"{prediction.shape[1]}x{prediction.shape[0]} vs {label.shape[1]}x{label.shape[0]}"
                    mismatched.add(uri)
                    if len(errors) < MAX_LISTED:
                        errors.append({"image_uri": uri, "error": f"the run's mask and the review differ: {sizes}"})
                    continue
                matrix = confusion_matrix(label, prediction, len(names) + 1)
                confusion += matrix
                pixels += int(matrix.sum())
                matched.add(uri)
    unmatched = [uri for uri in wanted if uri not in matched and uri not in mismatched]
    errors += [{"image_uri": uri, "error": "no labelled row in the run"} for uri in unmatched[:MAX_LISTED]]
    return EvaluationResult(
        benchmark=benchmark,
        model=str(manifest.get("model", {}).get("id") or manifest.get("run_id")),
        data=run_uri,
        class_names=[*names, UNLABELLED],
        confusion=confusion,
        metrics=compute_metrics(confusion),
        images_total=len(wanted),
        images_evaluated=len(matched),
        labelled_pixels=pixels,
        errors=errors,
        images_failed=len(wanted) - len(matched),
        seconds=time.perf_counter() - started,
        predictor={"labels": run_uri, "run_id": manifest.get("run_id"), "reviewed": reviewed.source},
    )
