"""How model workers are placed and started: GPUs and CPUs per model actor, how many actors, and the process
settings of CPU workers; :class:`ModelActors` turns them into Ray Data's ``map_batches`` keyword arguments
(labelling and evaluation), :func:`cpu_worker_runtime_env` into Ray Train's worker runtime_env.

CPU workers (no GPU given to them) get malloc settings. Ray Data runs an actor's UDF, and Ray Train its training
function, in a thread other than the process's main thread. glibc gives such a thread a malloc arena of its own,
built from 64 MiB heaps that are unmapped as soon as they empty, so each forward pass maps and page-faults its
activations afresh. ``benchmarks/worker_thread.py``
with vit_b16 on a 2-core CPU: the same Predictor call took 1.28x as long in a worker thread as in the main
thread (6.7x the page faults, 3.4 s of system time per call); with one arena, a 32 MiB mmap threshold and a
high trim threshold 1.07x. Blocks of 32 MiB and more are still unmapped on free; the Predictor turns mmap off
around its model calls so that those activations stay in the heap too (``catseg.allocator``).

The settings are environment variables read by glibc when the process starts, so they travel in the worker's
runtime_env (Ray merges its env_vars with the job's). A variable the driver's environment already sets is left
to that value. GPU workers keep their activations in the CUDA caching allocator and get nothing.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

from pipelines import cluster

logger = logging.getLogger(__name__)

GPU_MAP_WORKER_DEFAULT_CPUS = 1.0  # what Ray Data reserves for a map worker with GPUs that names no num_cpus


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


def actor_resources(
    num_gpus_per_actor: float | None, max_actors: int | None, cluster_gpus: float | None = None
) -> tuple[float, int]:
    """(GPUs per model actor, max model actors) for the options left as None: 1 GPU per actor and one actor per
    GPU when the cluster has GPUs, else one CPU actor. ``cluster_gpus`` defaults to the connected cluster's."""
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if cluster_gpus else 0.0
        if not cluster_gpus and cluster.can_grow():
            # ray.cluster_resources() counts live nodes only: GPU workers scaled to zero look like no GPUs at all
            logger.warning(
                "the Ray cluster has no GPU now, so the model runs on CPU. On an autoscaling cluster whose GPU "
                "workers are at zero, pass --num-gpus-per-actor 1 and --max-actors N so that Ray starts them."
            )
    if max_actors is None:
        max_actors = max(1, int(cluster_gpus // num_gpus_per_actor)) if num_gpus_per_actor > 0 else 1
    return num_gpus_per_actor, max_actors


@dataclass(frozen=True)
class ModelActors:
    """The model actor pool of a pipeline, resolved against the connected cluster."""

    num_gpus_per_actor: float
    max_actors: int
    cpus_per_actor: float

    @classmethod
    def plan(
        cls,
        num_gpus_per_actor: float | None,
        max_actors: int | None,
        cpus_per_actor: float,
        reserve_cpus: float,
    ) -> ModelActors:
        """Defaults filled in (:func:`actor_resources`), and refused when no node can hold one actor beside
        ``reserve_cpus`` for the pipeline's other tasks (see :func:`pipelines.cluster.require_node`)."""
        num_gpus, max_actors = actor_resources(num_gpus_per_actor, max_actors)
        cluster.require_node(
            cpus_per_actor,
            num_gpus,
            "a model actor",
            "lower --cpus-per-actor / --num-gpus-per-actor",
            reserve_cpus=reserve_cpus,
        )
        return cls(num_gpus, max_actors, cpus_per_actor)

    @property
    def torch_threads(self) -> int:
        return max(1, math.ceil(self.cpus_per_actor))

    def map_batches_args(self) -> dict[str, Any]:
        """compute (the UDF in each actor's main thread), num_gpus, num_cpus (unnamed where Ray's default is the
        same) and (CPU actors) the malloc runtime_env, for ``Dataset.map_batches``."""
        resources: dict[str, float] = {"num_gpus": self.num_gpus_per_actor, "num_cpus": self.cpus_per_actor}
        if self.num_gpus_per_actor and self.cpus_per_actor == GPU_MAP_WORKER_DEFAULT_CPUS:
            # Ray Data calls num_cpus beside num_gpus "experimental" (a warning per run); left out, a GPU map worker
            # reserves this same 1 CPU by Ray's own default. Other CPU counts must be named, warning or not: Ray has
            # no other way to reserve CPUs (resources={"CPU": n} is refused).
            del resources["num_cpus"]
        return {
            # One call at a time per actor (Ray Data's default) and that call in the actor's main thread, not in
            # the extra thread Ray Data otherwise runs it in: there torch's OpenMP workers sleep between
            # operations instead of spinning (about 7,900 voluntary context switches per image against 470,
            # 1.68 instead of 1.84 busy cores in a 2-CPU labelling run; benchmarks/README.md).
            "compute": ray.data.ActorPoolStrategy(
                min_size=1, max_size=self.max_actors, max_concurrent_calls_per_actor=1, enable_true_multi_threading=True
            ),
            **resources,
            **cpu_worker_remote_args(self.num_gpus_per_actor),
        }


# Fine-tuning: each read/decode/augment task of the data pipeline (pipelines.training.datasets) takes this many
# CPUs, and the workers must leave room for at least one of them
LOAD_TASK_CPUS = 1.0
DATA_PIPELINE_CPUS = LOAD_TASK_CPUS
MIN_WORKER_CPUS = 0.1  # below this a worker's torch threads would crawl


def plan_training_worker_cpus(num_workers: int, cpus_per_worker: float | None, use_gpu: bool) -> float:
    """CPUs per training worker, so that the workers and the data pipeline can all run.

    The data pipeline (shuffle, then read/decode/augment tasks of 1 CPU each) needs a CPU of its own: workers
    that take every CPU of a cluster that cannot grow wait for batches forever. The default is 1 CPU per worker,
    lowered on such a cluster to share what the data pipeline leaves (2 workers on 2 CPUs: 0.5 each); explicit
    numbers that leave the pipeline nothing are refused. A cluster with an autoscaler keeps the numbers given.
    """
    gpus = 1.0 if use_gpu else 0.0
    total = cluster.total_cpus()
    free = total - DATA_PIPELINE_CPUS
    if cpus_per_worker is not None:
        cpus = cpus_per_worker
        if not cluster.can_grow() and num_workers * cpus > free:
            raise cluster.UnschedulableError(
                f"--num-workers {num_workers} x --cpus-per-worker {cpus:g} take "
                f"{num_workers * cpus:g} of this Ray cluster's {total:g} CPUs and leave the data pipeline "
                f"less than the {DATA_PIPELINE_CPUS:g} it needs: lower --cpus-per-worker (at most "
                f"{max(free, 0) / num_workers:.2f}) or --num-workers, or leave --cpus-per-worker unset"
            )
    elif cluster.can_grow() or free >= num_workers:
        cpus = 1.0
    else:
        cpus = math.floor(100 * max(free, 0) / num_workers) / 100
        if cpus < MIN_WORKER_CPUS:
            raise cluster.UnschedulableError(
                f"{num_workers} training workers cannot share the {max(free, 0):g} CPUs that this Ray "
                f"cluster's {total:g} leave beside the data pipeline: lower --num-workers"
            )
        print(  # the job's own log: a default chosen for this machine is said, not hidden
            f"{num_workers} training workers x {cpus:g} CPU: {DATA_PIPELINE_CPUS:g} of this cluster's "
            f"{total:g} CPUs stay with the data pipeline (--cpus-per-worker sets it)",
            flush=True,
        )
    what = f"a training worker{' with a GPU' if gpus else ''}"
    cluster.require_node(cpus, gpus, what, "lower --cpus-per-worker" + (" or drop --use-gpu" if gpus else ""))
    return cpus
