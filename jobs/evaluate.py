"""Evaluate CAT-Seg on a paper benchmark (mIoU, sliding-window protocol) as a Ray Data job, or a labelling run's
labels against reviewed annotations.

    python -m jobs.evaluate --data s3://bucket/datasets --benchmark ade150 --checkpoint s3://bucket/models/b16 \\
        --output s3://bucket/eval/b16
    python -m jobs.evaluate --benchmark label-studio --data export.json --model vit_b16   # a model vs reviews
    python -m jobs.evaluate --benchmark label-studio --data export.json --labels s3://bucket/labels/run1

Prints a per-class table and the headline mIoU, writes ``evaluation_<benchmark>.json`` (and the summed
confusion matrix) under --output. --checkpoint takes a catseg.save_model directory, an official .pth, a
fine-tuning checkpoint (``RUN/step_N``) or a fine-tuning run directory (its latest checkpoint).
Runs on an embedded local Ray unless a cluster address is set (RAY_ADDRESS, as under `ray job submit`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jobs.options import add_model_actor_options, add_model_options
from pipelines.evaluation import BENCHMARKS, REVIEWED_FORMATS, EvaluationConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        required=True,
        help="datasets root ($DETECTRON2_DATASETS) or the benchmark's folder; for manifest: the Parquet/CSV file; "
        "label-studio: a Label Studio JSON export; coco: a COCO JSON file",
    )
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    add_model_options(
        parser,
        labels_help="no model: score this jobs.label output's stored masks against the reviewed images "
        "(--benchmark label-studio or coco), matched by image URI",
    )
    parser.add_argument("--label-studio-url", help="label-studio: the server /data/upload/ images come from "
                        "(API key in LABEL_STUDIO_API_KEY; they are copied under --output)")  # fmt: skip
    parser.add_argument("--local-files-root", help="label-studio: Label Studio's LOCAL_FILES_DOCUMENT_ROOT")
    parser.add_argument("--classes", help="class names, one per line (required for manifest; else replaces prompts)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images (in file-name order)")
    parser.add_argument("--output", help="directory/prefix (or .json file) for the report")
    add_model_actor_options(
        parser,
        EvaluationConfig,
        precision_help="model arithmetic; evaluate twice to measure what bfloat16/float16 costs in mIoU",
    )
    args = parser.parse_args(argv)
    if args.labels and args.benchmark not in REVIEWED_FORMATS:
        formats = " or ".join(REVIEWED_FORMATS)
        parser.error(f"--labels scores a run against reviewed annotations: use --benchmark {formats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from pipelines import cluster, storage
    from pipelines.evaluation import evaluate, format_table, headline, load_benchmark, write_report
    from pipelines.images import LabelIdError
    from pipelines.label_studio import LabelStudioAccess
    from pipelines.model_stage import CatSegPredictorFactory
    from pipelines.models import resolve_model

    try:
        config = EvaluationConfig(
            batch_size=args.batch_size,
            num_gpus_per_actor=args.num_gpus_per_actor,
            max_actors=args.max_actors,
            cpus_per_actor=args.cpus_per_actor,
        )
        output_dir = args.output.rsplit("/", 1)[0] if args.output and args.output.endswith(".json") else args.output
        if output_dir:
            storage.check_writable(output_dir)
        access = LabelStudioAccess(args.label_studio_url, os.environ.get("LABEL_STUDIO_API_KEY"), args.local_files_root)
        uploads = storage.join(output_dir, "reviewed-images") if output_dir else None
        if args.labels:
            return _evaluate_labels(args, access, uploads)
        evaluation_set = load_benchmark(
            args.benchmark, args.data, classes=args.classes, limit=args.limit, access=access, copy_uploads_to=uploads
        )
        model = resolve_model(args.model, args.checkpoint)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{evaluation_set.benchmark}: {len(evaluation_set)} images under {evaluation_set.root}, "
        f"{len(evaluation_set.vocabulary)} prompts, {evaluation_set.num_classes} classes; model {model.model_id}",
        flush=True,
    )

    cluster.connect()  # RAY_ADDRESS (set by `ray job submit`) or an embedded local Ray
    factory = CatSegPredictorFactory(
        model.uri, cpu_threads=max(1, math.ceil(args.cpus_per_actor)), precision=args.precision
    )
    try:
        result = evaluate(evaluation_set, factory, config, model_id=model.model_id)
    except (LabelIdError, cluster.UnschedulableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except cluster.CapacityLostError as err:
        print(f"error: the evaluation stopped: {err}; run the same command again once a node is back", file=sys.stderr)
        return 1
    finally:
        cluster.shutdown()
    print(format_table(result))
    print(headline(result))
    for error in result.errors[:10]:
        print(f"failed: {error['image_uri']}: {error['error']}", file=sys.stderr)
    if args.output:
        print(f"report: {write_report(result, args.output)}")
    failed = f", {result.images_failed} images FAILED (see the report)" if result.images_failed else ""
    print(f"done in {result.seconds:.1f} s: {result.benchmark} mIoU {_percent(result.metrics.miou)}{failed}")
    return 0


def _evaluate_labels(args: argparse.Namespace, access: object, uploads: str | None) -> int:
    """--labels RUN: the run's stored masks against the reviewed images; no model, no Ray."""
    from pipelines.evaluation import evaluate_labels, format_table, headline, read_reviewed, write_report

    reviewed = read_reviewed(args.benchmark, args.data, args.classes, access=access, copy_uploads_to=uploads)
    result = evaluate_labels(args.labels, reviewed, benchmark=f"{args.benchmark}-labels")
    print(format_table(result))
    print(headline(result))
    if reviewed.skipped:
        print(f"{len(reviewed.skipped)} reviewed images left out of the export (see the warnings above)")
    for error in result.errors[:10]:
        print(f"unmatched: {error['image_uri']}: {error['error']}", file=sys.stderr)
    if args.output:
        print(f"report: {write_report(result, args.output)}")
    print(f"labels of {args.labels}: mIoU {_percent(result.metrics.miou)} on {result.images_evaluated} of "
          f"{result.images_total} reviewed images")  # fmt: skip
    return 0


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
