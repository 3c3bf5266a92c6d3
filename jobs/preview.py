"""Write a static HTML preview of a labelling run: images, mask overlays, class fractions, errors.

    python -m jobs.preview --output s3://bucket/labels/run1 --to ./preview [--n 50] [--where "width >= 512"]
        [--order uncertain]

Open <DIR>/index.html in a browser. --where is a SQL condition on the table `labels` (as in jobs.query).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.preview", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output URI of a jobs.label run")
    parser.add_argument("--to", required=True, help="directory for index.html and its images")
    parser.add_argument("--n", type=int, default=50, help="labelled images to show (default: 50)")
    parser.add_argument("--where", help="SQL condition on `labels` selecting the images to show")
    parser.add_argument(
        "--order",
        choices=["sample", "uncertain"],
        default="sample",
        help="sample: a stable pseudo-random sample (default); uncertain: the least certain labels first",
    )
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.labelling import render_preview

    try:
        index = render_preview(args.output, args.to, n=args.n, where=args.where, order=args.order)
    except Exception as err:  # SQL errors, missing output, unwritable destination: one line, not a traceback
        message = " ".join(str(err).split())
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr)
        return 2
    print(f"preview written to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
