"""Peak memory and time of each export on a run of N rows (default 10,000): streaming means flat memory.

The run is written by our own encode stage (``encode_predictions``) from synthetic label maps (a few classes per
image, blocks of pixels), so no model is needed; each export then runs in a fresh process and reports its peak RSS
(VmHWM) above the RSS after imports, and its time. Run it at two sizes to see how memory grows with the rows:

    python benchmarks/export_memory.py --rows 10000
    python benchmarks/export_memory.py --rows 2000 --size 256x192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import datasets, label_studio_sdk.converter.brush, pycocotools.mask  # imports before the baseline
    from pipelines.labelling.exports import export

    def rss_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    kind, output, destination = sys.argv[1:4]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_mib("VmRSS")
    start = time.perf_counter()
    result = export(kind, output, destination)
    print(json.dumps({"images": result.images, "seconds": time.perf_counter() - start,
                      "above_mib": rss_mib("VmHWM") - before}))
    """
)


def write_run(output: Path, rows: int, height: int, width: int, classes: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.labelling import LabelOutput
    from pipelines.labelling.stages import encode_predictions
    from pipelines.model_stage import PREDICTED_SCHEMA

    names = [f"class {i}" for i in range(classes)]
    rng = np.random.default_rng(0)
    (output / "data").mkdir(parents=True)
    for part, start in enumerate(range(0, rows, 500)):
        count = min(500, rows - start)
        labels = []
        for _ in range(count):
            blocks = rng.choice(classes, size=(4, 4)).astype(np.uint8)  # up to 16 regions, a few classes
            labels.append(np.kron(blocks, np.ones((height // 4, width // 4), np.uint8)).tobytes())
        confidence = rng.uniform(0.3, 1.0, (height, width)).astype(np.float32).tobytes()
        table = pa.table(
            {
                "image_id": [f"{start + i:032x}" for i in range(count)],
                "source_uri": [f"s3://bucket/images/{start + i}.jpg" for i in range(count)],
                "width": pa.array([width] * count, pa.int32()),
                "height": pa.array([height] * count, pa.int32()),
                "labels": pa.array(labels, pa.large_binary()),
                "confidence": pa.array([confidence] * count, pa.large_binary()),
                "mean_confidence": rng.uniform(0.3, 1, count),
                "low_confidence_fraction": rng.uniform(0, 1, count),
                "mean_margin": rng.uniform(0, 0.5, count),
                "error": pa.array([None] * count, pa.string()),
                "error_kind": pa.array([None] * count, pa.string()),
            },
            schema=PREDICTED_SCHEMA,
        )
        out = encode_predictions(table, class_names=names, run_id="bench", model_id="bench-model", vocab_id="v")
        pq.write_table(out, output / "data" / f"part-{part:05d}.parquet")
    manifest = {"run_id": "bench", "vocabulary": {"names": names}, "model": {"id": "bench-model"},
                "config": {"unlabelled_value": 255}}  # fmt: skip
    LabelOutput(str(output)).write_manifest(manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--size", default="128x96", help="mask WIDTHxHEIGHT")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--exports", nargs="*", default=["hf", "label-studio", "coco", "png"])
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "run"
        start = time.perf_counter()
        write_run(output, args.rows, height, width, args.classes)
        seconds = time.perf_counter() - start
        print(f"{args.rows} rows of {width}x{height} masks, {args.classes} classes (written in {seconds:.0f} s)")
        for kind in args.exports:
            command = [sys.executable, "-c", MEASURE, kind, str(output), str(Path(tmp) / kind)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if result.returncode != 0:
                print(f"{kind:13s} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"{kind:13s} {stats['images']} images in {stats['seconds']:6.1f} s "
                f"({stats['images'] / stats['seconds']:7.0f}/s), peak {stats['above_mib']:6.0f} MiB above the start"
            )


if __name__ == "__main__":
    main()
