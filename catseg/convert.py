"""Convert an official CAT-Seg checkpoint to our format: ``python -m catseg.convert IN.pth OUT``."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import load_official_checkpoint, save_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catseg.convert", description=__doc__)
    parser.add_argument("source", help="official .pth file (local path or fsspec URI)")
    parser.add_argument("output", help="output checkpoint directory (local path or fsspec URI)")
    args = parser.parse_args(argv)
    try:
        model = load_official_checkpoint(args.source)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_model(model, args.output)
    print(f"converted {args.source} ({model.config.name}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
