"""How the labelling driver scales with the size of the lake: planning time, driver peak RSS, rows/s end to end.

    python benchmarks/lake_scale.py --sizes 100000 1000000

Each size is a Parquet manifest of URIs that do not exist (local paths): every row becomes a transient error row,
so this measures the per-row cost of the pipeline itself (plan, read attempt, decode/model/encode pass-through,
write) with the tiny model, not the model. The driver's RSS is sampled from /proc every 20 ms; the figures are
its peak above the RSS after Ray started (what grows with the input, if anything).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa
import pyarrow.parquet as pq


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the largest seen since ``reset``."""

    def __init__(self) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def reset(self) -> float:
        self.peak = rss_mib()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--plan-only", action="store_true", help="measure planning only (no labelling)")
    parser.add_argument("--rows-per-file", type=int, default=256, help="jobs.label's option (its default: 256)")
    args = parser.parse_args()

    import ray

    import catseg
    from pipelines.labelling import LabelConfig, LabelOutput, OutputConflictError, run_labelling
    from pipelines.labelling.plan import plan_inputs
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    work = Path(tempfile.mkdtemp(prefix="lake-scale-"))
    checkpoint = str(work / "tiny")
    catseg.save_model(catseg.build_model("tiny").eval(), checkpoint)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler = PeakRSS()
    print(f"machine: {os.cpu_count()} CPUs; Ray {ray.__version__}; driver RSS after Ray start {rss_mib():.0f} MiB; "
          f"--rows-per-file {args.rows_per_file}")  # fmt: skip
    print("| URIs | planning | driver peak RSS growth, planning | end to end | rows/s | driver peak RSS growth, run |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        manifest = work / f"manifest-{size}.parquet"
        pq.write_table(pa.table({"uri": [f"/nonexistent/lake/{i:08d}.jpg" for i in range(size)]}), manifest)

        base = sampler.reset()
        started = time.perf_counter()
        plan = plan_inputs(output=LabelOutput(str(work / f"plan-{size}")), run_id="r", input_uri=None,
                           manifest_uri=str(manifest), uri_column="uri", limit=None, retry_errors="transient",
                           conflict=OutputConflictError)  # fmt: skip
        planning = time.perf_counter() - started
        planning_growth = sampler.peak - base
        assert plan.todo == size, plan
        row = f"| {size:,} | {planning:.1f} s | {planning_growth:.0f} MiB |"
        if args.plan_only:
            print(row + " | | |", flush=True)
            continue
        config = LabelConfig(
            output_uri=str(work / f"out-{size}"),
            vocabulary=load_vocabulary("road,car,tree"),
            model=resolve_model(checkpoint=checkpoint),
            manifest_uri=str(manifest),
            num_gpus_per_actor=0,
            cpus_per_actor=0.5,
            rows_per_file=args.rows_per_file,
        )
        base = sampler.reset()
        started = time.perf_counter()
        summary = run_labelling(config)
        total = time.perf_counter() - started
        assert summary.transient_errors == size and summary.missing == 0, summary
        print(f"{row} {total:.1f} s | {size / total:,.0f} | {sampler.peak - base:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
