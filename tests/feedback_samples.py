"""What the labelling loop's tests read: Label Studio exports shaped as Label Studio 1.2x writes them (brush RLE from
label-studio-sdk's own encoder) and labelling-run outputs written by our own encode stage, without a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from labelling_samples import encode_image
from PIL import Image

from pipelines.labelling import LabelOutput, image_id_for
from pipelines.labelling.stages import encode_predictions
from pipelines.model_stage import PREDICTED_SCHEMA


def brush_result(mask: np.ndarray, name: str, region: str) -> dict:
    """One brushlabels region as the editor saves it: RLE of a 4-channel image whose alpha is the mask."""
    from label_studio_sdk.converter.brush import mask2rle

    height, width = mask.shape
    rle = [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [name]},
        "id": region,
        "from_name": "label",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "manual",
    }


def annotation(
    annotation_id: int, task_id: int, results: list[dict], *, updated: str, cancelled: bool = False,
    ground_truth: bool = False,
) -> dict:  # fmt: skip
    return {
        "id": annotation_id,
        "completed_by": 1,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": ground_truth,
        "created_at": updated,
        "updated_at": updated,
        "draft_created_at": None,
        "lead_time": 12.5,
        "prediction": {},
        "result_count": len(results),
        "unique_id": f"u{annotation_id}",
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": task_id,
        "project": 1,
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def task(task_id: int, image: str, annotations: list[dict], **data) -> dict:
    """A task of a project's JSON export (predictions listed by id, as the export writes them)."""
    return {
        "id": task_id,
        "annotations": annotations,
        "file_upload": None,
        "drafts": [],
        "predictions": [task_id],
        "data": {"image": image, **data},
        "meta": {},
        "created_at": "2026-11-30T10:00:00.000000Z",
        "updated_at": "2026-12-01T10:00:00.000000Z",
        "inner_id": task_id,
        "total_annotations": sum(not a["was_cancelled"] for a in annotations),
        "cancelled_annotations": sum(a["was_cancelled"] for a in annotations),
        "total_predictions": 1,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 1,
        "updated_by": 1,
        "comment_authors": [],
    }


def write_export(path: Path, tasks: list[dict], label_config: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tasks))
    if label_config is not None:
        (path.parent / "label_config.xml").write_text(label_config)
    return str(path)


def reviewed_export(path: Path, labels: dict[str, np.ndarray], names: list[str]) -> str:
    """A Label Studio export in which a reviewer painted ``labels`` (image URI -> class-id map) exactly."""
    tasks = []
    for i, (image, label) in enumerate(labels.items(), start=1):
        results = [brush_result(label == k, name, f"r{i}-{k}") for k, name in enumerate(names) if (label == k).any()]
        tasks.append(task(i, image, [annotation(i, i, results, updated="2026-12-02T09:00:00.000000Z")]))
    return write_export(path, tasks)


def write_run(
    root: Path,
    images: dict[str, tuple[np.ndarray, np.ndarray]],
    names: list[str],
    *,
    margins: dict[str, float] | None = None,
    confidence: dict[str, np.ndarray] | None = None,
) -> str:
    """A labelling output under ``root``: ``images`` maps a file name to (pixels, label map); the images are
    written under root/images, the rows by our encode stage (confidence PNGs when ``confidence`` is given)."""
    rows = {name: [] for name in PREDICTED_SCHEMA.names}
    for name, (pixels, label_map) in images.items():
        source = root / "images" / name
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(encode_image(Image.fromarray(pixels), "PNG"))
        height, width = label_map.shape
        probability = (confidence or {}).get(name, np.full((height, width), 0.9, np.float32)).astype(np.float32)
        margin = (margins or {}).get(name, 0.5)
        values = {"image_id": image_id_for(str(source)), "source_uri": str(source), "width": width,
                  "height": height, "labels": label_map.astype(np.uint8).tobytes(), "confidence": probability.tobytes(),
                  "mean_confidence": float(probability.mean()), "low_confidence_fraction": 0.0, "mean_margin": margin,
                  "error": None, "error_kind": None}  # fmt: skip
        for column, value in values.items():
            rows[column].append(value)
    predicted = pa.table(rows, schema=PREDICTED_SCHEMA)
    output = encode_predictions(
        predicted, class_names=names, run_id="loop-run", model_id="tiny-model", vocab_id="v",
        with_confidence=confidence is not None,
    )  # fmt: skip
    (root / "run" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(output, root / "run" / "data" / "part-0.parquet")
    run = str(root / "run")
    LabelOutput(run).write_manifest({
        "run_id": "loop-run", "vocabulary": {"names": names}, "model": {"id": "tiny-model"},
        "config": {"unlabelled_value": 255, "mask_bits": 8, "confidence": confidence is not None},
    })  # fmt: skip
    return run
