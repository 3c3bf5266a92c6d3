"""SQL over a labelling output (DuckDB; the rows are the table `labels`), and mask export for other tools.

    python -m jobs.query --output s3://bucket/labels/run1 --sql "SELECT count(*) FROM labels WHERE error IS NULL"
    python -m jobs.query --output s3://bucket/labels/run1 \\
        --sql "SELECT s.class_name, count(*) AS images FROM labels, unnest(class_stats) AS t(s) GROUP BY 1"
    python -m jobs.query --output s3://bucket/labels/run1 --export coco-rle --to ./coco [--where "..."]
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output URI of a jobs.label run")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--sql", help="a DuckDB query over the table `labels`")
    action.add_argument("--export", choices=["png", "coco-rle"], help="write masks as PNG files or COCO RLE JSON")
    parser.add_argument("--to", help="export destination (directory or URI)")
    parser.add_argument("--where", help="SQL condition on `labels` selecting the images to export")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table", help="--sql output format")
    parser.add_argument("--max-rows", type=int, default=100, help="rows to print in table format (default: 100)")
    args = parser.parse_args(argv)
    if args.export and not args.to:
        parser.error("--export needs --to DIR")
    return args


def _print_table(table, fmt: str, max_rows: int) -> None:
    if fmt == "json":
        import json

        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        import polars as pl  # pretty printing when installed; pyarrow rendering otherwise

        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=80):
            print(pl.from_arrow(table))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.output import export_coco_rle, export_png, query_labels, require_output

    try:
        require_output(args.output)  # before anything is exported: a typo must not read as zero rows
        if args.sql:
            table = query_labels(args.output, args.sql)
            try:
                _print_table(table, args.format, args.max_rows)
            except ImportError:  # no polars: plain pyarrow rendering
                print(table.slice(0, args.max_rows).to_string(preview_cols=20))
            return 0
        export = export_png if args.export == "png" else export_coco_rle
        result = export(args.output, args.to, where=args.where)
        print(f"exported {result.images} images to {args.to} ({args.export})")
        return 0
    except Exception as err:  # SQL errors, missing output: one line, not a traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
