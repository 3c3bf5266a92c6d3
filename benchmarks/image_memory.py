"""Memory per image: the model's peak against image size, and a whole labelling run's peak.

1. One ``Predictor.predict_labels`` call per image size (1, 12, 24, 48 MP, 3:2, T = 150 classes by default), each
   in a fresh process: peak resident memory above the loaded model, a warm-up forward included (CPU: the peak is
   reset after loading through /proc/self/clear_refs; CUDA: ``torch.cuda.max_memory_allocated``). ``banded`` is
   the default path; ``one call`` upsamples each class chunk to the whole image at once (the computation before
   the bands, which gives the same labels) for comparison, up to ``--one-call-up-to`` MP.
2. ``jobs.label`` with default options over a folder of small images, then the same folder plus one image of each
   ``--run-sizes`` MP: the peak of the whole process tree (sum of PSS, so pages Ray's object store shares between
   processes count once), sampled from /proc every 0.2 s since Ray's workers are not the driver's children on a
   cluster, and the model worker's own peak RSS.

    python benchmarks/image_memory.py                       # tiny model: memory above the model does not depend on it
    python benchmarks/image_memory.py --model vit_b16 --sizes 1 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch, catseg
    import catseg.predictor

    def rss_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    name, classes, megapixels, one_call = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    if one_call:
        catseg.predictor.BANDED_ABOVE_PIXELS = 10**12
    torch.manual_seed(0)
    predictor = catseg.Predictor(catseg.build_model(name).eval())
    names = [f"class {i}" for i in range(classes)]
    predictor.embed_classes(names)
    height = int(round((megapixels * 1e6 / 1.5) ** 0.5))
    width = int(round(height * 1.5))
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    image[::3, ::5] = 200  # some structure; memory does not depend on the content
    cuda = predictor.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) restarts from the current RSS: loading does not count
        before = rss_mib("VmRSS")
    # the warm-up forward counts: on CPU the Predictor keeps freed memory for the next forward
    # (catseg.allocator), so a warm process already holds the forward's working memory
    predictor.predict_labels(np.zeros((64, 64, 3), np.uint8), names)
    start = time.perf_counter()
    labels, confidence = predictor.predict_labels(image, names)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")
    print(json.dumps({"above_mib": peak - before, "seconds": seconds, "height": height, "width": width,
                      "device": str(predictor.device), "labels": str(labels.dtype)}))
    """
)


def measure_predictor(model: str, classes: int, megapixels: float, one_call: bool) -> dict:
    command = [sys.executable, "-c", MEASURE, model, str(classes), str(megapixels), "1" if one_call else "0"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the whole process tree of a labelling job ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _memory_kib(pid: int, field: str, source: str) -> int:
    try:
        with open(f"/proc/{pid}/{source}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def _is_model_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"SegmentationModel" in f.read()
    except OSError:
        return False


class TreeSampler(threading.Thread):
    """Peak of the summed PSS of a process and its descendants, and the model worker's peak RSS."""

    def __init__(self, root: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_tree_kib = self.peak_model_kib = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            pids = _descendants(self.root)
            self.peak_tree_kib = max(self.peak_tree_kib, sum(_memory_kib(p, "Pss", "smaps_rollup") for p in pids))
            models = [_memory_kib(p, "VmRSS", "status") for p in pids if _is_model_worker(p)]
            self.peak_model_kib = max([self.peak_model_kib, *models])
            time.sleep(self.period)


def write_images(folder: Path, small: int, sizes_mp: list[float]) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(small):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"small{i}.jpg")
    for megapixels in sizes_mp:
        height = round((megapixels * 1e6 / 1.5) ** 0.5)
        image = np.full((height, round(height * 1.5), 3), 90, dtype=np.uint8)
        image[::3, ::5] = 200
        Image.fromarray(image).save(folder / f"large{megapixels:g}mp.jpg", quality=90)


def measure_run(images: Path, output: Path, checkpoint: Path, classes: int) -> dict:
    vocab = output.parent / "vocabulary.txt"
    vocab.write_text("".join(f"class {i}\n" for i in range(classes)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    command = [sys.executable, "-m", "jobs.label", "--input", str(images), "--vocab-file", str(vocab),
               "--checkpoint", str(checkpoint), "--output", str(output)]  # fmt: skip
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(job.pid)
    sampler.start()
    log, _ = job.communicate()
    sampler.stopped.set()
    sampler.join()
    return {
        "returncode": job.returncode,
        "seconds": time.perf_counter() - start,
        "tree_peak_mib": sampler.peak_tree_kib / 1024,
        "model_worker_peak_mib": sampler.peak_model_kib / 1024,
        "log_tail": log.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="architecture with random weights (tiny, vit_b16, ...)")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--sizes", type=float, nargs="*", default=[1, 12, 24, 48], help="megapixels")
    parser.add_argument("--one-call-up-to", type=float, default=24, help="MP; the one-call path needs ~0.3 GB/MP")
    parser.add_argument("--run-sizes", type=float, nargs="*", default=[12, 24], help="large images in the run")
    parser.add_argument("--small", type=int, default=8, help="640x480 images in the run")
    args = parser.parse_args()

    print(f"1. Predictor.predict_labels, model {args.model}, T={args.classes}: peak above the loaded model")
    for megapixels in args.sizes:
        banded = measure_predictor(args.model, args.classes, megapixels, one_call=False)
        one_call = (
            measure_predictor(args.model, args.classes, megapixels, one_call=True)
            if megapixels <= args.one_call_up_to
            else None
        )
        if "error" in banded:
            print(f"{megapixels:5g} MP  failed: {banded['error']}")
            continue
        line = (
            f"{megapixels:5g} MP ({banded['width']}x{banded['height']})  banded {banded['above_mib']:7.0f} MiB "
            f"{banded['seconds']:6.1f} s"
        )
        if one_call and "error" not in one_call:
            line += (
                f"   one call {one_call['above_mib']:7.0f} MiB {one_call['seconds']:6.1f} s"
                f"   ratio {one_call['above_mib'] / max(banded['above_mib'], 1):5.1f}x"
            )
        print(f"{line}  [{banded['device']}, labels {banded['labels']}]", flush=True)

    if not args.run_sizes and not args.small:
        return
    import catseg

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = root / "model"
        catseg.save_model(catseg.build_model(args.model), str(checkpoint))
        print(f"\n2. jobs.label, default options, T={args.classes}: whole process tree (PSS) and model worker peaks")
        large = f"+ {', '.join(f'{s:g}' for s in args.run_sizes)} MP"
        for name, sizes in (("small only", []), (large, args.run_sizes)):
            images = root / f"images-{len(sizes)}"
            write_images(images, args.small, sizes)
            stats = measure_run(images, root / f"labels-{len(sizes)}", checkpoint, args.classes)
            print(
                f"{args.small} x 0.3 MP {name:14s}: tree peak {stats['tree_peak_mib']:7.0f} MiB, model worker "
                f"{stats['model_worker_peak_mib']:7.0f} MiB, {stats['seconds']:5.0f} s, exit {stats['returncode']}",
                flush=True,
            )
            if stats["returncode"] != 0:
                print("   " + "\n   ".join(stats["log_tail"]))


if __name__ == "__main__":
    main()
