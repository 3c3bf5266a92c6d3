"""SQL over a labelling output (DuckDB; the rows are the table `labels`), exports for other tools, a review queue.

    python -m jobs.query --output s3://bucket/labels/run1 --sql "SELECT count(*) FROM labels WHERE error IS NULL"
    python -m jobs.query --output s3://bucket/labels/run1 \\
        --sql "SELECT s.class_name, count(*) AS images FROM labels, unnest(class_stats) AS t(s) GROUP BY 1"
    python -m jobs.query --output s3://bucket/labels/run1 --export hf|label-studio|coco|png --to DIR [--where "..."]
    python -m jobs.query --output s3://bucket/labels/run1 --review 100        # the 100 least certain images
    python -m jobs.query --output s3://bucket/labels/run1 --review 100 --format csv --to review.csv
    python -m jobs.query --output s3://bucket/labels/run1 --review 500 --export label-studio --to ./review
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output URI of a jobs.label run")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--sql", help="a DuckDB query over the table `labels`")
    action.add_argument(
        "--export",
        choices=["hf", "label-studio", "coco", "coco-rle", "png"],
        help="Hugging Face dataset, Label Studio tasks, COCO annotations (coco-rle: the same), or PNG masks",
    )
    parser.add_argument(
        "--to", help="export destination (directory or URI); with --sql / --review: a file for the rows"
    )
    parser.add_argument("--where", help="SQL condition on `labels` selecting the images to export")
    parser.add_argument(
        "--review", type=int, metavar="N", help="the N least certain images (smallest mean_margin first); "
        "alone: list them; with --export: export only them"
    )  # fmt: skip
    parser.add_argument("--embed-images", action="store_true", help="hf: store the source image bytes, not URIs")
    parser.add_argument(
        "--format", choices=["table", "csv", "jsonl", "json", "parquet"], default="table",
        help="rows of --sql / --review: an aligned table (ids and URIs whole), csv, jsonl (json: the same) or parquet",
    )  # fmt: skip
    parser.add_argument("--max-rows", type=int, default=100, help="rows to print in table format (default: 100)")
    args = parser.parse_args(argv)
    if not (args.sql or args.export or args.review):
        parser.error("give --sql, --export or --review")
    if args.sql and args.review:
        parser.error("--review lists images itself; write the ORDER BY in --sql instead")
    if args.export and not args.to:
        parser.error("--export needs --to DIR")
    if args.format == "json":
        args.format = "jsonl"  # one JSON object per line, as before
    if args.format == "parquet" and not args.to:
        parser.error("--format parquet writes a file: give --to FILE")
    if args.review is not None and args.review < 1:
        parser.error("--review N needs N >= 1")
    if args.embed_images and args.export != "hf":
        parser.error("--embed-images applies to --export hf")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.labelling import LabelOutput, export, query_labels, review_queue, write_result

    try:
        output = LabelOutput.existing(args.output)  # before anything is exported: a typo must not read as zero rows
        if args.sql or (args.review and not args.export):
            table = query_labels(output, args.sql) if args.sql else review_queue(output, args.review, where=args.where)
            write_result(table, args.format, args.to, max_rows=args.max_rows)
            if args.to:
                print(f"wrote {table.num_rows} rows to {args.to} ({args.format})", file=sys.stderr)
            return 0
        options = {"where": args.where, "review": args.review}
        if args.export == "hf":
            options["embed_images"] = args.embed_images
        result = export(args.export, output, args.to, **options)
        notes = "".join(f"; {note}" for note in result.notes)
        print(f"exported {result.images} images to {args.to} ({args.export}){notes}")
        return 0
    except Exception as err:  # SQL errors, missing output or extra: one line, not a traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
