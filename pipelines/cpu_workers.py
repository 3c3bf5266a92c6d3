"""Process settings for model workers that compute on CPU (no GPU given to them).

Ray Data runs an actor's UDF, and Ray Train its training function, in a thread other than the process's main
thread. glibc gives such a thread a malloc arena of its own, built from 64 MiB heaps that are unmapped as soon as
they empty, so each forward pass maps and page-faults its activations afresh. ``benchmarks/worker_thread.py``
with vit_b16 on a 2-core CPU: the same Predictor call took 1.28x as long in a worker thread as in the main
thread (6.7x the page faults, 3.4 s of system time per call); with these settings 1.07x. One arena and a high
trim threshold keep freed memory for the next call, as the main thread's heap does; blocks of 32 MiB and more
are still returned to the OS.

The settings are environment variables read by glibc when the process starts, so they travel in the worker's
runtime_env (Ray merges its env_vars with the job's). A variable the driver's environment already sets is left
to that value. GPU workers keep their activations in the CUDA caching allocator and get nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

CPU_WORKER_MALLOC_ENV: Mapping[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest allowed value
    "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
}


def cpu_worker_env_vars(num_gpus: float) -> dict[str, str]:
    """The malloc variables a model worker with ``num_gpus`` GPUs should start with ({} for GPU workers)."""
    if num_gpus > 0 or not sys.platform.startswith("linux"):
        return {}
    return {name: value for name, value in CPU_WORKER_MALLOC_ENV.items() if name not in os.environ}


def cpu_worker_runtime_env(num_gpus: float) -> dict[str, Any]:
    """The runtime_env for a model worker with ``num_gpus`` GPUs (Ray Train's worker_runtime_env); {} if none."""
    env_vars = cpu_worker_env_vars(num_gpus)
    return {"env_vars": env_vars} if env_vars else {}


def cpu_worker_remote_args(num_gpus: float) -> dict[str, Any]:
    """Extra Ray remote arguments for a model actor with ``num_gpus`` GPUs (Ray Data's map_batches); {} if none."""
    runtime_env = cpu_worker_runtime_env(num_gpus)
    return {"runtime_env": runtime_env} if runtime_env else {}
