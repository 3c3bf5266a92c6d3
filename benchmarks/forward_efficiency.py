"""How close the model forward comes to the machine's matrix-multiply rate, on the default inference path.

One view of 384² through ``model(image, classes, class_chunk=Predictor.DEFAULT_CLASS_CHUNK)`` under
``torch.inference_mode`` inside ``Predictor.forward_context()``, as the Predictor calls its model (autocast; on
CPU the malloc setting of ``catseg.allocator``). FLOPs are counted with ``torch.utils.flop_counter`` (matmuls,
convolutions, attention); the machine's rate is a 2048² matmul in the same precision on the same threads, measured
in the same run between the forwards (median of each), so that load on a shared machine affects both alike.

    python benchmarks/forward_efficiency.py --model vit_b16 --classes 150 --repeats 5
    python benchmarks/forward_efficiency.py --no-retain-freed-memory   # glibc's default malloc, for comparison
    python benchmarks/forward_efficiency.py --profile                  # the operators that take the time
    python benchmarks/forward_efficiency.py --baseline 1e2e9f6         # outputs and time against a revision

``--baseline`` runs that revision's model (same weights) in the same process, alternating with ours: both under
this process's malloc settings, so the ratio is the model code's alone; the largest logit difference is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode

import catseg
from catseg.predictor import AUTOCAST_DTYPES

GEMM_SIZE = 2048


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device, repeats: int = 1) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a GEMM_SIZE² matmul (best of a few calls: the machine's rate, not its noise)."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype)
    a @ b
    calls = 4 if device.type == "cpu" else 50
    return 2 * GEMM_SIZE**3 / min(seconds(lambda: a @ b, device, calls) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16", choices=catseg.list_models())
    parser.add_argument("--classes", type=int, nargs="+", default=[150])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", default="float32", choices=catseg.PRECISIONS)
    parser.add_argument("--no-retain-freed-memory", action="store_true", help="leave glibc's malloc as it is")
    parser.add_argument("--profile", action="store_true", help="print the operators by time (torch.profiler)")
    parser.add_argument("--baseline", help="git revision whose model to compare outputs and time with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        run(args, directory)


def run(args: argparse.Namespace, directory: str) -> None:

    device = catseg.default_device()
    torch.manual_seed(0)
    model = catseg.build_model(args.model).to(device).eval()
    baseline = None
    if args.baseline:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from speedup import import_revision

        baseline = import_revision(args.baseline, directory).build_model(args.model).eval()
        baseline.load_state_dict(model.state_dict())
        baseline.to(device)
    predictor = catseg.Predictor(
        model, device=device, precision=args.precision, retain_freed_memory=not args.no_retain_freed_memory
    )
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "CPU")
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"model: {args.model}, precision: {args.precision}, "
        f"malloc: {'glibc defaults' if args.no_retain_freed_memory else 'retain freed memory (default path)'}"
    )
    gemm_dtype = AUTOCAST_DTYPES[args.precision] or torch.float32
    size = model.config.input_size
    image = torch.rand(1, 3, size, size, device=device) * 255
    for classes in args.classes:
        text = predictor.embed_classes([f"class {i}" for i in range(classes)]).detach()

        def forward(text=text, model=model) -> torch.Tensor:
            with predictor.forward_context():  # autocast, and on CPU the malloc setting of the default path
                return model(image, text, class_chunk=predictor.class_chunk, truncate=predictor.truncate)

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward()
        flops = counter.get_total_flops()
        with torch.inference_mode():
            forward()  # warm-up
            usage = resource.getrusage(resource.RUSAGE_SELF)
            times, rates = [], []
            for _ in range(args.repeats):
                rates.append(gemm_rate(device, gemm_dtype))
                times.append(seconds(forward, device))
            after = resource.getrusage(resource.RUSAGE_SELF)
            rates.append(gemm_rate(device, gemm_dtype))
        forward_s, rate = statistics.median(times), statistics.median(rates)
        achieved = flops / forward_s
        faults = (after.ru_minflt - usage.ru_minflt) / args.repeats
        system = (after.ru_stime - usage.ru_stime) / args.repeats
        print(
            f"T={classes:5d}  forward 1 x {size}^2: {forward_s:6.3f} s (median of {args.repeats}; "
            f"{min(times):.3f}-{max(times):.3f}), {flops / 1e9:6.1f} GFLOP -> {achieved / 1e9:6.1f} GFLOP/s; "
            f"{GEMM_SIZE}^2 GEMM {rate / 1e9:6.1f} GFLOP/s; achieved / GEMM = {achieved / rate:.3f}; "
            f"per forward {faults:,.0f} page faults, {system:.2f} s system time",
            flush=True,
        )
        if baseline is not None:
            with torch.inference_mode():
                difference = (forward(model=baseline).float() - forward().float()).abs().max().item()
                ours, theirs = [], []
                for _ in range(args.repeats):  # alternate, so drifting load hits both
                    theirs.append(seconds(lambda: forward(model=baseline), device))
                    ours.append(seconds(forward, device))
            before, after = statistics.median(theirs), statistics.median(ours)
            print(
                f"         baseline {args.baseline}: {before:6.3f} s, ours {after:6.3f} s (alternating, medians): "
                f"speedup {before / after:.2f}x; max |logit difference| {difference:.1e}",
                flush=True,
            )
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.inference_mode(), torch.profiler.profile(activities=activities) as p:
                forward()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(p.key_averages().table(sort_by=key, row_limit=20))


if __name__ == "__main__":
    main()
