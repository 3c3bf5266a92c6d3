"""Fine-tuning throughput on this machine: images/s per worker for 1 vs N Ray Train workers, and what the
augmentation stage costs per image.

    python benchmarks/training_throughput.py --model vit_b16 --steps 4 --workers 1 2

Random weights (no downloads), COCO-Stuff-sized synthetic data (640x480 JPEGs, 171 classes by default) written to a
temporary folder in the manifest layout, crop 384, the paper's solver. Images/s come from the per-step reports,
skipping the first step of each run (model warm-up, first batch fetch). Memory grows with the vocabulary (the
decoder runs per class): vit_b16 with 171 classes needs about 10 GB per CPU worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import ray
import ray.train
from PIL import Image

from pipelines.images import decode_image
from pipelines.training.augment import augment
from pipelines.training.config import FinetuneConfig
from pipelines.training.datasets import decode_training_label
from pipelines.training.run import run_finetuning
from pipelines.training.sources import COCO_STUFF_CLASSES


def write_synthetic_manifest(folder: str, count: int, num_classes: int, seed: int = 0) -> tuple[str, str]:
    """640x480 JPEGs of blocky random classes, their label PNGs, a Parquet manifest and a classes file."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[str]] = {"image_uri": [], "label_uri": []}
    palette = rng.integers(0, 256, (num_classes, 3), dtype=np.uint8)
    for index in range(count):
        blocks = rng.integers(0, num_classes, (6, 8), dtype=np.uint8)
        label = np.kron(blocks, np.ones((80, 80), dtype=np.uint8))  # 480 x 640
        image = (palette[label] + rng.normal(0, 10, (*label.shape, 3))).clip(0, 255).astype(np.uint8)
        image_path, label_path = os.path.join(folder, f"{index}.jpg"), os.path.join(folder, f"{index}.png")
        Image.fromarray(image).save(image_path, quality=90)
        Image.fromarray(label).save(label_path)
        rows["image_uri"].append(image_path)
        rows["label_uri"].append(label_path)
    manifest = os.path.join(folder, "manifest.parquet")
    pyarrow.parquet.write_table(pa.table(rows), manifest)
    classes = os.path.join(folder, "classes.txt")
    with open(classes, "w") as f:
        f.write("\n".join(COCO_STUFF_CLASSES[:num_classes]) + "\n")
    return manifest, classes


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def augmentation_ms_per_image(manifest: str, crop_size: int, repeats: int = 20) -> float:
    """Decode + augment cost of one image on one core (what each Ray Data map task does per row)."""
    table = pyarrow.parquet.read_table(manifest)
    pairs = list(zip(table.column("image_uri").to_pylist(), table.column("label_uri").to_pylist(), strict=True))
    payloads = [(read_file(image), read_file(label)) for image, label in pairs[:repeats]]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for image_bytes, label_bytes in payloads:
        augment(decode_image(image_bytes), decode_training_label(label_bytes), crop_size, rng)
    return (time.perf_counter() - start) / len(payloads) * 1000


class StepRates(ray.train.UserCallback):
    """Appends every report's images/s per worker (mean over workers) to a local file (runs in the controller)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        rate = statistics.mean(m["images_per_s_per_worker"] for m in metrics)
        with open(self.path, "a") as f:
            f.write(f"{rate}\n")


def measure(args: argparse.Namespace, manifest: str, classes: str, workers: int, folder: str) -> list[float]:
    """Train ``args.steps`` steps on ``workers`` workers; images/s per worker of every step after the first."""
    rates_file = os.path.join(folder, f"rates-{workers}.txt")

    config = FinetuneConfig(
        data=manifest,
        layout="manifest",
        classes=classes,
        storage=os.path.join(folder, "runs"),
        run_name=f"throughput-{workers}w",
        model=args.model,
        num_workers=workers,
        cpus_per_worker=args.cpus_per_worker,
        max_steps=args.steps,
        batch_size_per_worker=args.batch_size,
        crop_size=args.crop_size,
        eval_every=0,
        checkpoint_every=10**9,  # only the final step is saved
        log_every=1,
        max_failures=0,
        keep_checkpoints=1,
    )
    run_finetuning(config, callbacks=[StepRates(rates_file)])
    with open(rates_file) as f:
        return [float(line) for line in f][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1, help="images per worker per step")
    parser.add_argument("--crop-size", type=int, default=384)
    parser.add_argument("--classes", type=int, default=171, help="vocabulary size (COCO-Stuff: 171)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        manifest, classes = write_synthetic_manifest(folder, args.images, args.classes)
        aug_ms = augmentation_ms_per_image(manifest, args.crop_size)
        print(f"decode + augment (640x480 JPEG -> {args.crop_size} crop): {aug_ms:.1f} ms per image on one core")
        ray.init(num_cpus=max(2, int(max(args.workers) * args.cpus_per_worker) + 1), include_dashboard=False)
        try:
            summary = {}
            for workers in args.workers:
                try:
                    summary[workers] = measure(args, manifest, classes, workers, folder)
                except ray.train.TrainingFailedError as err:  # e.g. out of memory with many workers on one node
                    summary[workers] = str(err).splitlines()[0:3]
        finally:
            ray.shutdown()
    print(f"\n{args.model}, crop {args.crop_size}, {args.classes} classes, batch {args.batch_size} per worker:")
    for workers, rates in summary.items():
        if not rates or isinstance(rates[0], str):
            print(f"  {workers} worker(s): failed: {' '.join(rates) if rates else 'no steps measured'}")
            continue
        per_worker = statistics.median(rates)
        print(
            f"  {workers} worker(s): {per_worker:.3f} images/s per worker, {per_worker * workers:.3f} images/s total "
            f"({1000 / per_worker:.0f} ms per image; augmentation {aug_ms / (1000 / per_worker) * 100:.1f}% of it)"
        )


if __name__ == "__main__":
    main()
