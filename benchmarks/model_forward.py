"""Forward time of a CAT-Seg model (random weights) and Predictor throughput, on this machine's device.

python benchmarks/model_forward.py --model vit_b16 --classes 20 150 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import catseg
from catseg.predictor import AUTOCAST_DTYPES


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, embeddings cache
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16", choices=catseg.list_models())
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 150])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=catseg.PRECISIONS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = catseg.default_device()
    model = catseg.build_model(args.model).to(device).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"device: {device} ({name}), torch threads: {torch.get_num_threads()}, model: {args.model}")
    image = torch.rand(1, 3, model.config.input_size, model.config.input_size, device=device) * 255
    photo = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    for precision in args.precision:
        predictor = catseg.Predictor(model, device=device, precision=precision)
        autocast = AUTOCAST_DTYPES[precision]
        for classes in args.classes:
            names = [f"class {i}" for i in range(classes)]
            text = predictor.embed_classes(names)

            def forward(text=text, autocast=autocast):
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    model(image, text)

            with torch.inference_mode():
                forward_seconds = timed(forward, args.repeats)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            predict = timed(lambda names=names, p=predictor: p.predict_labels(photo, names), args.repeats)
            peak = ""
            if device.type == "cuda":
                peak = f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:5.2f} GiB"
            print(
                f"{precision:9s} T={classes:5d}  forward 1 x {model.config.input_size}^2: "
                f"{forward_seconds * 1000:8.1f} ms   Predictor (5 views, 640x480 image): {predict:6.3f} s/image "
                f"= {1 / predict:7.2f} images/s{peak}",
                flush=True,
            )


if __name__ == "__main__":
    main()
