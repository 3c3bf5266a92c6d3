"""Peak memory of one Predictor image (or one model forward) against vocabulary size, chunked and unchunked.

Each measurement runs in a fresh process (peak RSS on CPU, reset after loading; ``torch.cuda.max_memory_allocated``
on GPU), so the numbers do not contaminate each other. Random weights are fine: memory does not depend on them.

    python benchmarks/large_vocabulary.py --model vit_b16 --chunked 256 1024 4096 --unchunked 256 1024
    python benchmarks/large_vocabulary.py --model vit_b16 --forward-only    # one 384x384 view: 5x faster
    python benchmarks/large_vocabulary.py --forward-only --chunked 256 4096 --unchunked --streamed 256 4096

``--streamed``: the memory-flat mode (``Predictor(stream_classes=True)``, the default above 256 untruncated
classes; with ``--forward-only``, ``CATSeg.segment_streamed`` consumed chunk by chunk into a running argmax, as
the Predictor does), against the held chunks (``stream_classes=False``) at the same T.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch, catseg

    def rss_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    name, classes, chunk, forward_only = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    streamed = sys.argv[5] == "1"
    model = catseg.build_model(name)
    # chunk 0 = unchunked: every class through the per-class parts (and the stitching) at once
    predictor = catseg.Predictor(model, truncate=False, class_chunk=chunk or classes, stream_classes=streamed)
    photo = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    view = torch.rand(1, 3, model.config.input_size, model.config.input_size, device=predictor.device) * 255
    names = [f"class {i}" for i in range(classes)]
    text = predictor.embed_classes(names)
    cuda = predictor.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the loading peak does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = rss_mib("VmRSS")
    start = time.perf_counter()
    if forward_only and streamed:  # chunk by chunk into a running argmax: no T x 96 x 96 logits at once
        with torch.inference_mode():
            dense, guidance = model.encode_images(view)
            best = None
            for part, logits in model.segment_streamed(dense, guidance, text, class_chunk=chunk):
                top = logits.amax(dim=1)
                best = top if best is None else torch.maximum(best, top)
    elif forward_only:  # one 384 x 384 view through the model: a fifth of the Predictor's work per image
        with torch.inference_mode():
            model(view, text, class_chunk=chunk or None, truncate=False)
    else:
        predictor.predict_labels(photo, names)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "above_model_mib": peak - before, "seconds": seconds,
                      "device": str(predictor.device)}))
    """
)


def measure(model: str, classes: int, chunk: int, forward_only: bool, streamed: bool = False) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flags = ["1" if forward_only else "0", "1" if streamed else "0"]
    command = [sys.executable, "-c", MEASURE, model, str(classes), str(chunk), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--chunk", type=int, default=32, help="classes per chunk in the chunked runs")
    parser.add_argument("--chunked", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--unchunked", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--streamed", type=int, nargs="*", default=[], help="T values in the memory-flat mode")
    parser.add_argument(
        "--forward-only",
        action="store_true",
        help="one 384x384 view through the model instead of a whole Predictor image (5 views; for slow CPUs)",
    )
    args = parser.parse_args()
    what = "one model forward (1 view)" if args.forward_only else "one Predictor image (5 views, 640x480)"
    print(f"model {args.model}, {what}: peak resident memory of the process")
    runs = [(t, args.chunk, False) for t in args.chunked] + [(t, 0, False) for t in args.unchunked]
    runs += [(t, args.chunk, True) for t in args.streamed]
    results = {}
    for classes, chunk, streamed in runs:
        results[(classes, chunk, streamed)] = stats = measure(args.model, classes, chunk, args.forward_only, streamed)
        label = "streamed" if streamed else f"chunk {chunk}" if chunk else "unchunked"
        if "error" in stats:
            print(f"T={classes:5d} {label:10s} failed: {stats['error']}", flush=True)
        else:
            peak, above, seconds = stats["peak_mib"], stats["above_model_mib"], stats["seconds"]
            print(
                f"T={classes:5d} {label:10s} peak {peak:7.0f} MiB ({above:6.0f} MiB above the loaded model)  "
                f"{seconds:7.1f} s  {stats['device']}",
                flush=True,
            )
    base = results.get((256, args.chunk, False), {})
    for mode, sizes in (("chunked", args.chunked), ("streamed", args.streamed)):
        if not sizes or (mode == "chunked" and max(sizes) == 256):
            continue
        largest = results.get((max(sizes), args.chunk, mode == "streamed"), {})
        if "peak_mib" in base and "peak_mib" in largest:
            ratio = largest["peak_mib"] / base["peak_mib"]
            above = largest["above_model_mib"] / base["above_model_mib"]
            print(
                f"peak(T={max(sizes)}, {mode}) / peak(T=256, chunked) = {ratio:.2f} "
                f"(above the loaded model: {above:.2f})"
            )
    for classes in args.streamed:  # the price of streaming: recomputation
        held, flat = results.get((classes, args.chunk, False), {}), results.get((classes, args.chunk, True), {})
        if "seconds" in held and "seconds" in flat:
            print(f"T={classes}: streamed / chunked time = {flat['seconds'] / held['seconds']:.2f}")


if __name__ == "__main__":
    main()
