"""Evaluate CAT-Seg on a paper benchmark (mIoU, sliding-window protocol) as a Ray Data job.

    python -m jobs.evaluate --data s3://bucket/datasets --benchmark ade150 --checkpoint s3://bucket/models/b16 \\
        --output s3://bucket/eval/b16

Prints a per-class table and the headline mIoU, writes ``evaluation_<benchmark>.json`` (and the summed
confusion matrix) under --output. --checkpoint takes a catseg.save_model directory, an official .pth, a
fine-tuning checkpoint (``RUN/step_N``) or a fine-tuning run directory (its latest checkpoint).
Runs on an embedded local Ray unless a cluster address is set (RAY_ADDRESS, as under `ray job submit`).
"""

from __future__ import annotations

import argparse
import math
import sys

from jobs.options import add_model_actor_options, add_model_options
from pipelines.evaluation import BENCHMARKS, EvaluationConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        required=True,
        help="datasets root ($DETECTRON2_DATASETS) or the benchmark's folder; for manifest: the Parquet/CSV file",
    )
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    add_model_options(parser)
    parser.add_argument("--classes", help="class names, one per line (required for manifest; else replaces prompts)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images (in file-name order)")
    parser.add_argument("--output", help="directory/prefix (or .json file) for the report")
    add_model_actor_options(
        parser,
        EvaluationConfig,
        precision_help="model arithmetic; evaluate twice to measure what bfloat16/float16 costs in mIoU",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from pipelines import cluster, storage
    from pipelines.evaluation import evaluate, format_table, headline, load_benchmark, write_report
    from pipelines.images import LabelIdError
    from pipelines.model_stage import CatSegPredictorFactory
    from pipelines.models import resolve_model

    try:
        config = EvaluationConfig(
            batch_size=args.batch_size,
            num_gpus_per_actor=args.num_gpus_per_actor,
            max_actors=args.max_actors,
            cpus_per_actor=args.cpus_per_actor,
        )
        if args.output:
            storage.check_writable(args.output.rsplit("/", 1)[0] if args.output.endswith(".json") else args.output)
        evaluation_set = load_benchmark(args.benchmark, args.data, classes=args.classes, limit=args.limit)
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


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
