"""Predictor speed of this checkout against an earlier revision of ``catseg``, in one process, same weights.

The baseline package is extracted from git (``git archive``) and imported under another name, both models get
the same random weights, and the two are timed alternately on the same image so that machine load affects both
alike. Also prints the largest difference between their probabilities (the speed work must not change outputs).

    python benchmarks/speedup.py --model vit_b16 --classes 150 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import catseg

REPO = Path(__file__).resolve().parent.parent
# The model as it first landed, before the speed work (fused-kernel window attention, split guidance
# convolutions, channels-last decoder).
DEFAULT_BASELINE = "a95a56d"


def import_revision(revision: str, directory: str) -> ModuleType:
    """``catseg`` as of ``revision``, importable next to the current one as ``catseg_<revision>``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "catseg"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    name = f"catseg_{revision}"
    package = Path(directory) / "catseg"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16", choices=catseg.list_models())
    parser.add_argument("--classes", type=int, nargs="+", default=[150])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare against")
    args = parser.parse_args()

    device = catseg.default_device()
    with tempfile.TemporaryDirectory() as directory:
        baseline = import_revision(args.baseline, directory)
        torch.manual_seed(0)
        ours = catseg.build_model(args.model).eval()
        theirs = baseline.build_model(args.model).eval()
        theirs.load_state_dict(ours.state_dict())
        predictors = {
            "baseline": baseline.Predictor(theirs, device=device),
            "ours": catseg.Predictor(ours, device=device),
        }
        name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
        print(
            f"device: {device} ({name}, {os.cpu_count()} CPUs), torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, model {args.model}, baseline revision {args.baseline}"
        )
        photo = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        for classes in args.classes:
            names = [f"class {i}" for i in range(classes)]
            # warm-up, vocabulary caches, and the output comparison
            probs = {key: predictor.predict(photo, names) for key, predictor in predictors.items()}
            difference = float(np.abs(probs["ours"] - probs["baseline"]).max())
            del probs
            seconds: dict[str, list[float]] = {key: [] for key in predictors}
            for _ in range(args.repeats):
                for key, predictor in predictors.items():  # alternate, so drifting load hits both
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    predictor.predict_labels(photo, names)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[key].append(time.perf_counter() - start)
            before, after = np.median(seconds["baseline"]), np.median(seconds["ours"])
            print(
                f"T={classes:4d}  baseline {before:7.2f} s/image  ours {after:7.2f} s/image  "
                f"speedup {before / after:.2f}x  max |probability difference| {difference:.1e}"
            )


if __name__ == "__main__":
    main()
