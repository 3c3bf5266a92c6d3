"""Predictor time in the main thread vs a worker thread, with glibc's default malloc and with the settings CPU
model workers get (pipelines/workers.py). Ray Data runs actor UDFs in a worker thread unless told otherwise (our
model actors are told: pipelines/workers.py); Ray Train runs its training function in one.

    python benchmarks/worker_thread.py --arch vit_b16 --repeats 3

Each malloc setting runs in a fresh process (glibc reads it at start-up); inside it the same Predictor call is
timed alternately in the main thread and in a new thread, with page faults and system time per call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vit_b16", help="architecture with random weights (default: vit_b16)")
    parser.add_argument("--classes", type=int, default=20, help="vocabulary size (default: 20)")
    parser.add_argument("--size", default="480x640", help="image size HxW (default: 480x640)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per thread kind (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    import resource
    import threading
    import time

    import numpy as np
    import torch

    import catseg

    torch.set_num_threads(args.threads)
    predictor = catseg.Predictor(catseg.build_model(args.arch).eval())
    names = [f"class {i}" for i in range(args.classes)]
    height, width = (int(v) for v in args.size.lower().split("x"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    predictor.predict_labels(image, names)  # warm-up, embeds the classes

    def call(out: list[dict[str, float]]) -> None:
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        predictor.predict_labels(image, names)
        after = resource.getrusage(resource.RUSAGE_SELF)
        seconds = time.perf_counter() - started
        busy = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        out.append(
            {
                "seconds": seconds,
                "system_seconds": after.ru_stime - before.ru_stime,
                "page_faults": after.ru_minflt - before.ru_minflt,
                "cores_busy": busy / seconds,
                # torch's OpenMP workers that sleep between operations instead of spinning show up here
                "voluntary_switches": after.ru_nvcsw - before.ru_nvcsw,
            }
        )

    results: dict[str, list[dict[str, float]]] = {"main": [], "thread": []}
    for _ in range(args.repeats):
        call(results["main"])
        worker = threading.Thread(target=call, args=(results["thread"],))
        worker.start()
        worker.join()
    return results


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    from pipelines.workers import CPU_WORKER_MALLOC_ENV

    child = [sys.executable, __file__, "--child", *sys.argv[1:]]
    plain_env = {k: v for k, v in os.environ.items() if k not in CPU_WORKER_MALLOC_ENV}
    settings = {"glibc defaults": plain_env, "CPU worker settings": {**plain_env, **CPU_WORKER_MALLOC_ENV}}
    print(f"{args.arch}, {args.classes} classes, one {args.size} image per call, {args.threads} torch threads")
    means: dict[tuple[str, str], float] = {}
    for label, env in settings.items():
        output = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
        results = json.loads(output.strip().splitlines()[-1])
        for kind, calls in results.items():
            mean = {key: sum(c[key] for c in calls) / len(calls) for key in calls[0]}
            means[label, kind] = mean["seconds"]
            times = ", ".join(f"{c['seconds']:.2f}" for c in calls)
            print(
                f"{label:20s} {kind:6s}: {mean['seconds']:6.2f} s per call ({times}), "
                f"{mean['system_seconds']:.2f} s system, {mean['page_faults']:,.0f} page faults, "
                f"{mean['cores_busy']:.2f} cores busy, {mean['voluntary_switches']:,.0f} voluntary context switches"
            )
    for label in settings:
        print(f"{label}: worker thread / main thread = {means[label, 'thread'] / means[label, 'main']:.2f}")
    print(
        "worker thread, defaults / with the settings = "
        f"{means['glibc defaults', 'thread'] / means['CPU worker settings', 'thread']:.2f}"
    )


if __name__ == "__main__":
    main()
