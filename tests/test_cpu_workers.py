"""CPU model workers start with the malloc settings that keep a worker thread's freed memory for the next call, and
the model actors run their UDF in the actor's main thread."""

from __future__ import annotations

import sys

import pytest

from pipelines.workers import (
    CPU_WORKER_MALLOC_ENV,
    ModelActors,
    cpu_worker_env_vars,
    cpu_worker_remote_args,
    cpu_worker_runtime_env,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")


def _probe_class() -> type:
    # defined in a function so cloudpickle ships it by value (workers cannot import this test module)
    class _Probe:
        def environment(self) -> dict[str, str | None]:
            import os

            return {name: os.environ.get(name) for name in CPU_WORKER_MALLOC_ENV}

        def page_faults_per_reuse_in_a_thread(self, megabytes: int = 20, buffers: int = 6, repeats: int = 10) -> float:
            """Page faults per page when buffers of a forward pass's size (more than one 64 MiB arena heap in all)
            are allocated, touched and freed over and over in a non-main thread, as a Ray UDF does."""
            import resource
            import threading

            import numpy as np

            faults: list[int] = []

            def allocate_and_free() -> None:
                held = [np.ones(megabytes << 18, dtype=np.float32) for _ in range(buffers)]
                del held

            def work() -> None:
                allocate_and_free()  # first use maps the memory
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                for _ in range(repeats):
                    allocate_and_free()
                faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
            return faults[0] / (repeats * buffers * (megabytes << 8))

    return _Probe


@linux_only
def test_cpu_model_actor_reuses_freed_memory_in_its_worker_thread(ray_cluster):
    import ray

    probe = ray.remote(num_cpus=0.25, **cpu_worker_remote_args(0))(_probe_class()).remote()
    try:
        assert ray.get(probe.environment.remote()) == dict(CPU_WORKER_MALLOC_ENV)
        # with the settings freed buffers are reused without faulting their pages back in (glibc defaults: ~0.1)
        assert ray.get(probe.page_faults_per_reuse_in_a_thread.remote()) < 0.02
    finally:
        ray.kill(probe)


def _thread_probe_class() -> type:
    class _ThreadProbe:
        def __init__(self) -> None:
            import threading

            self.init_thread = threading.get_ident()

        def __call__(self, batch: dict) -> dict:
            import threading

            rows = len(batch["id"])
            batch["main_thread"] = [threading.current_thread() is threading.main_thread()] * rows
            batch["init_thread"] = [threading.get_ident() == self.init_thread] * rows
            return batch

    return _ThreadProbe


def test_model_actors_run_their_udf_in_the_actor_main_thread(ray_cluster):
    """Where torch's OpenMP workers keep spinning between operations (benchmarks/README.md, pipeline overhead)."""
    import ray

    actors = ModelActors(num_gpus_per_actor=0.0, max_actors=1, cpus_per_actor=0.5)
    rows = (
        ray.data.range(8, override_num_blocks=2)
        .map_batches(_thread_probe_class(), batch_size=4, **actors.map_batches_args())
        .take_all()
    )
    assert len(rows) == 8
    assert all(row["main_thread"] and row["init_thread"] for row in rows)


def test_gpu_workers_get_no_malloc_settings():
    assert cpu_worker_env_vars(1) == {} and cpu_worker_env_vars(0.5) == {}
    assert cpu_worker_remote_args(1) == {} and cpu_worker_runtime_env(1) == {}


@linux_only
def test_a_malloc_variable_the_driver_sets_is_left_to_it(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    env_vars = cpu_worker_env_vars(0)
    assert "MALLOC_ARENA_MAX" not in env_vars
    assert env_vars == {k: v for k, v in CPU_WORKER_MALLOC_ENV.items() if k != "MALLOC_ARENA_MAX"}
    assert cpu_worker_runtime_env(0) == {"env_vars": env_vars}
    assert cpu_worker_remote_args(0) == {"runtime_env": {"env_vars": env_vars}}
