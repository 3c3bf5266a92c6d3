"""What reduced precision (autocast bfloat16 / float16) changes: Predictor time and outputs against float32.

    python benchmarks/precision.py --model vit_b16 --classes 150
    python benchmarks/precision.py --checkpoint s3://bucket/models/b16 --image photo.jpg --classes 150

Prints, per precision: seconds per image, the largest probability difference to float32 and the fraction of
pixels whose label agrees with float32. Random weights (the default) show the numerical effect only; the mIoU
effect needs trained weights and labelled data: run ``jobs.evaluate`` with ``--precision`` and without.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

import catseg
from catseg import PRECISIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16", choices=catseg.list_models(), help="random-weight model")
    parser.add_argument("--checkpoint", help="a checkpoint URI instead of random weights")
    parser.add_argument("--image", help="an image file (default: random 480x640 pixels)")
    parser.add_argument("--classes", type=int, default=150)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = catseg.load_model(args.checkpoint) if args.checkpoint else catseg.build_model(args.model)
    if args.image:
        photo = np.asarray(Image.open(args.image).convert("RGB"))
    else:
        photo = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    names = [f"class {i}" for i in range(args.classes)]
    device = catseg.default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device {device} ({name}), model {model.config.name}, {args.classes} classes, image {photo.shape[:2]}")

    reference = None
    for precision in PRECISIONS:
        predictor = catseg.Predictor(model, device=device, precision=precision)
        predictor.predict_labels(photo, names[:2])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        probs = predictor.predict(photo, names)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if reference is None:
            reference = probs
            print(f"{precision:9s} {seconds:7.2f} s/image")
            continue
        difference = float(np.abs(probs - reference).max())
        agreement = float((probs.argmax(0) == reference.argmax(0)).mean())
        print(
            f"{precision:9s} {seconds:7.2f} s/image  max |probability difference| {difference:.4f}  "
            f"labels equal to float32 on {100 * agreement:.2f}% of pixels"
        )


if __name__ == "__main__":
    main()
