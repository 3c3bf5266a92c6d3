"""End-to-end labelling throughput vs a bare Predictor loop, on the same images and the same device.

    python benchmarks/labelling_throughput.py --arch tiny --images 48
    python benchmarks/labelling_throughput.py --checkpoint s3://bucket/models/b16 --input s3://bucket/images/

Without --checkpoint a model of --arch with random weights is saved to a temporary directory (the speed of a
model does not depend on its weights). Without --input, --images random PNGs of --size are written locally.
The pipeline figure is the wall time of the whole Ray Data run (read, decode, model, encode, write Parquet),
including the model actor's start-up; the steady-state figure is the difference between that run and a run on
the first quarter of the images (start-up cancels out); the bare figure is `Predictor.predict_labels_batch`
over decoded images after one warm-up batch, timed before and after the pipeline (their mean is the figure,
which cancels a steady drift of the machine's speed). Prints them in images/s and the ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="model checkpoint URI (default: random weights of --arch)")
    parser.add_argument("--arch", default="tiny", help="architecture for random weights (tiny, vit_b16, vit_l14)")
    parser.add_argument("--input", help="image prefix/URI (default: generated PNGs)")
    parser.add_argument("--images", type=int, default=48, help="generated images (default: 48)")
    parser.add_argument("--size", default="480x640", help="generated image size HxW (default: 480x640)")
    parser.add_argument("--vocab-preset", default="voc20", help="vocabulary preset (default: voc20)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--cpus-per-actor", type=float, help="default: all CPUs but 0.75 for the other stages (with a GPU: 2)"
    )
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (both loops)")
    parser.add_argument(
        "--no-bare-after",
        dest="bare_after",
        action="store_false",
        help="time the bare loop only before the pipeline, not also after it",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import ray
    import torch
    from PIL import Image

    import catseg
    from pipelines import storage
    from pipelines.images import decode_image
    from pipelines.labelling import LabelConfig, run_labelling
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    work = Path(tempfile.mkdtemp(prefix="catseg-bench-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(work / f"{args.arch}-random")
        catseg.save_model(catseg.build_model(args.arch), checkpoint)
    input_uri = args.input
    if input_uri is None:
        height, width = (int(v) for v in args.size.lower().split("x"))
        rng = np.random.default_rng(0)
        (work / "images").mkdir()
        for i in range(args.images):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(work / "images" / f"img{i:05d}.png")
        input_uri = str(work / "images")
    uris = storage.list_files(input_uri, storage.IMAGE_SUFFIXES)
    vocabulary = load_vocabulary(preset=args.vocab_preset)
    cpus = os.cpu_count() or 1
    # On a GPU the actor only feeds the device: the CPUs go to decoding and encoding
    cpus_per_actor = args.cpus_per_actor or (2.0 if torch.cuda.is_available() else max(1.0, cpus - 0.75))

    # Bare loop: same images, decoded up front, same batch size and thread count as the actor. Its model and images
    # are freed before the pipeline runs, so the driver holds nothing of them meanwhile.
    torch.set_num_threads(max(1, math.ceil(cpus_per_actor)))

    def bare_loop() -> tuple[float, str]:
        predictor = catseg.Predictor(catseg.load_model(checkpoint), precision=args.precision)
        images = [decode_image(storage.read_bytes(uri)) for uri in uris]
        predictor.predict_labels_batch(images[: args.batch_size], list(vocabulary.names))  # warm-up, embeds classes
        started = time.perf_counter()
        for start in range(0, len(images), args.batch_size):
            predictor.predict_labels_batch(images[start : start + args.batch_size], list(vocabulary.names))
        return time.perf_counter() - started, str(predictor.device)

    bare_before, device = bare_loop()

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def label(limit: int | None, name: str):
        config = LabelConfig(
            output_uri=str(work / name),
            vocabulary=vocabulary,
            model=resolve_model(checkpoint=checkpoint),
            input_uri=input_uri,
            batch_size=args.batch_size,
            cpus_per_actor=cpus_per_actor,
            limit=limit,
            precision=args.precision,
        )
        return run_labelling(config)

    # A short run first: the difference between the two runs is the steady-state rate, free of the actor's
    # start-up, model load and first-call warm-up (the bare loop's figure excludes its warm-up batch too).
    short_count = max(args.batch_size, len(uris) // 4 // args.batch_size * args.batch_size)
    short = label(short_count, "labels-short")
    summary = label(None, "labels")
    ray.shutdown()
    steady = (summary.processed - short.processed) / (summary.seconds - short.seconds)
    # The bare loop again after the pipeline: a machine whose speed drifts during the run (the 2-CPU development
    # host drifted by up to 15%) biases a before-only comparison; the mean of the two brackets the pipeline's runs
    bare_after = bare_loop()[0] if args.bare_after else None
    bare_seconds = bare_before if bare_after is None else (bare_before + bare_after) / 2
    bracket = "" if bare_after is None else f"; mean of {bare_before:.1f} s before and {bare_after:.1f} s after"

    bare = len(uris) / bare_seconds
    pipeline = summary.images_per_second
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else f"{cpus} CPU cores"
    print(
        f"model {summary.resources} checkpoint {checkpoint}\n"
        f"{len(uris)} images, {len(vocabulary)} classes, batch {args.batch_size}, device {device} ({gpu})\n"
        f"pipeline (Ray Data, end to end): {pipeline:.3f} images/s ({summary.seconds:.1f} s, "
        f"{summary.ok} ok, {summary.errors} errors)\n"
        f"pipeline, steady state:          {steady:.3f} images/s (the last {summary.processed - short.processed} "
        f"images: {summary.seconds:.1f} s for {summary.processed} minus {short.seconds:.1f} s for {short.processed})\n"
        f"bare Predictor loop:             {bare:.3f} images/s ({bare_seconds:.1f} s, after a warm-up batch{bracket})\n"
        f"ratio pipeline / bare:           {pipeline / bare:.2f} end to end, {steady / bare:.2f} steady state"
    )


if __name__ == "__main__":
    main()
