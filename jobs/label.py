"""Label an image collection with CAT-Seg on Ray Data; one Parquet row per image.

    python -m jobs.label --input s3://bucket/images/ --vocab-preset ade150 --checkpoint s3://bucket/models/b16 \\
        --output s3://bucket/labels/run1

Runs on an embedded local Ray unless a cluster address is set (RAY_ADDRESS, as under `ray job submit`).
Re-running the same command resumes: images already in the output are skipped, and error rows worth retrying
(a failed read, out of memory) are labelled again. Exit status: 0 when every input has a row and none is a transient
error, 1 when a re-run could still improve the output (rows missing, transient errors), 2 when refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.options import add_model_actor_options, add_model_options
from pipelines.labelling import LabelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", dest="input_uri", help="images: a prefix/directory or glob (s3://, gs://, local)")
    source.add_argument("--manifest", dest="manifest_uri", help="a Parquet/CSV/JSON-lines file listing image URIs")
    parser.add_argument("--uri-column", default=LabelConfig.uri_column, help="manifest column holding the URIs")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", help='comma-separated class names, e.g. "cat,dog,sky"')
    vocab.add_argument("--vocab-file", help="text (one class per line) or JSON file, local or any fsspec URI")
    vocab.add_argument("--vocab-preset", help="built-in: voc20, voc20b, pc59, pc459, ade150, ade847, cocostuff171")
    add_model_options(parser)
    parser.add_argument("--output", dest="output_uri", required=True, help="output URI (directory or prefix)")
    parser.add_argument("--run-id", help="run id (default: derived from input, vocabulary, model and options)")
    add_model_actor_options(
        parser,
        LabelConfig,
        precision_help="model arithmetic: bfloat16/float16 autocast is faster on GPUs, slightly different",
    )
    parser.add_argument("--confidence", action="store_true", help="also store per-pixel confidence PNGs")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        help="pixels whose max probability is below this get the unlabelled value (255 / 65535)",
    )
    parser.add_argument("--limit", type=int, help="label only the first N images of the listing or manifest")
    parser.add_argument(
        "--retry-errors",
        choices=("transient", "all", "none"),
        default=LabelConfig.retry_errors,
        help="error rows of earlier attempts to label again: transient (reads, out of memory; the default), "
        "all (also undecodable or oversize images), none",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=LabelConfig.max_pixels,
        help=f"larger images become error rows, refused before decoding (default: {LabelConfig.max_pixels:_})",
    )
    parser.add_argument(
        "--rows-per-file",
        type=int,
        default=LabelConfig.rows_per_file,
        help=f"rows per Parquet file (default: {LabelConfig.rows_per_file})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from pipelines import cluster
    from pipelines.cluster import UnschedulableError, one_line
    from pipelines.labelling import OutputConflictError, run_labelling
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    try:
        vocabulary = load_vocabulary(args.vocab, file=args.vocab_file, preset=args.vocab_preset)
        model = resolve_model(args.model, args.checkpoint)
        resolved = {"vocabulary": vocabulary, "model": model}  # --model is a name; the config holds its source
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelConfig) if hasattr(args, f.name)}
        config = LabelConfig(**{**options, **resolved})
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError, OutputConflictError) as err:
        print(f"error: {one_line(err, with_type=False)}", file=sys.stderr)
        return 2

    ray.data.DataContext.get_current().enable_progress_bars = True
    try:  # checks the inputs, then joins RAY_ADDRESS's cluster or starts an embedded Ray, then labels
        summary = run_labelling(config)
    except (ValueError, FileNotFoundError, PermissionError, OutputConflictError, UnschedulableError) as err:
        print(f"error: {one_line(err, with_type=False)}", file=sys.stderr)
        return 2
    except Exception as err:  # storage outage, lost nodes: Ray has logged the details above
        print(
            f"error: the run into {config.output_uri} stopped: {one_line(err)}. What was committed is kept: "
            "re-running the same command resumes",
            file=sys.stderr,
        )
        return 1
    finally:
        cluster.shutdown()

    retried = f", retried {summary.retried} earlier errors" if summary.retried else ""
    print(
        f"planned {summary.inputs} inputs in {summary.planning_seconds:.1f} s; labelled {summary.processed} images "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s); skipped {summary.skipped} "
        f"already done{retried}\n"
        f"output {summary.output_uri} (run {summary.run_id}): {summary.ok} masks, {summary.errors} errors "
        f"({summary.transient_errors} transient, {summary.permanent_errors} permanent), "
        f"{summary.missing} missing of {summary.inputs} inputs"
    )
    if not summary.healed:
        print("some inputs may still be labelled: run the same command again to retry missing rows and "
              "transient errors (failed reads, out of memory)")  # fmt: skip
    return 0 if summary.healed else 1


if __name__ == "__main__":
    sys.exit(main())
