"""Joining a Ray cluster, and refusing up front what it can never run.

A job without ``RAY_ADDRESS`` starts an embedded Ray on this machine: nothing can add nodes to it, so a request
no node can hold (``--num-gpus-per-actor 1`` on a CPU-only machine, more CPUs than it has, workers that leave the
data pipeline no CPU) would wait forever. Those are refused at once, in one line. On a cluster (``RAY_ADDRESS``,
as under ``ray job submit``) an autoscaler may add the node, so the job waits a bounded time, then gives up.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

# How long a job on a cluster waits for a node that can hold its workers (autoscalers take minutes).
RESOURCE_WAIT_SECONDS = float(os.environ.get("CATSEG_RESOURCE_WAIT_SECONDS", "600"))
_started_here = False  # this process started an embedded Ray (no autoscaler behind it)
_initialized_here = False  # this process called ray.init (so it shuts Ray down again)


class UnschedulableError(RuntimeError):
    """Workers that no node of the cluster can hold, now or (for an embedded Ray) ever."""


def connect() -> None:
    """The job's one ``ray.init``: the cluster at RAY_ADDRESS, else a new embedded Ray on this machine.

    Does nothing when Ray is already initialized (a caller that set up its own cluster keeps it)."""
    global _started_here, _initialized_here
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # "local" always starts a fresh instance: what the README promises without RAY_ADDRESS, and what lets the
    # checks below know that no autoscaler stands behind this cluster
    ray.init(address=address or "local")
    _started_here, _initialized_here = address is None, True


def shutdown() -> None:
    """Undo :func:`connect` (a Ray that someone else initialized stays up)."""
    global _started_here, _initialized_here
    if _initialized_here:
        ray.shutdown()
    _started_here = _initialized_here = False


def can_grow() -> bool:
    """False for an embedded Ray this process started (no autoscaler can add nodes); True on a cluster."""
    return not _started_here


@dataclass(frozen=True)
class NodeResources:
    cpus: float
    gpus: float


def alive_nodes() -> list[NodeResources]:
    return [
        NodeResources(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
        for node in ray.nodes()
        if node.get("Alive")
    ]


def _describe(nodes: list[NodeResources]) -> str:
    if not nodes:
        return "no live nodes"
    return ", ".join(f"{n.cpus:g} CPU / {n.gpus:g} GPU" for n in nodes)


def require_node(cpus: float, gpus: float, what: str, fix: str, reserve_cpus: float = 0.0) -> None:
    """Return once some node can hold one worker of ``cpus`` and ``gpus`` (its total resources, busy or not).

    Embedded Ray: raise at once if none can, or if the worker would leave less than ``reserve_cpus`` for the
    pipeline's other tasks (they would wait forever). Cluster: wait up to RESOURCE_WAIT_SECONDS for a node.
    """
    deadline = time.monotonic() + RESOURCE_WAIT_SECONDS
    warned = False
    while True:
        nodes = alive_nodes()
        extra = 0.0 if can_grow() else reserve_cpus
        if any(n.cpus >= cpus + extra and n.gpus >= gpus for n in nodes):
            return
        request = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        if extra:
            request += f", plus {extra:g} CPU for the pipeline's other tasks"
        if not can_grow():
            raise UnschedulableError(
                f"no node of this Ray cluster can hold {what} ({request}; nodes: {_describe(nodes)}) and an "
                f"embedded Ray cannot add one: {fix}, or run on a cluster (RAY_ADDRESS)"
            )
        if time.monotonic() > deadline:
            raise UnschedulableError(
                f"no node that can hold {what} ({request}) joined the cluster within {RESOURCE_WAIT_SECONDS:g} s "
                f"(nodes: {_describe(nodes)}): {fix}, or check the autoscaler's node types"
            )
        if not warned:
            logger.warning(f"waiting up to {RESOURCE_WAIT_SECONDS:g} s for a node that can hold {what} ({request})")
            warned = True
        time.sleep(5)


def one_line(err: BaseException, *, with_type: bool = True) -> str:
    """An exception as one line for a job's final ``error:`` line: the innermost cause Ray wrapped, first line.

    ``with_type=False`` for our own refusals, whose message already says everything."""
    # Ray's own exceptions (RayTaskError, Ray Data's wrappers) chain the exception the task raised: unwrap those
    # only; our messages already name the file and the fix, and their causes say less.
    while type(err).__module__.startswith("ray."):
        cause = getattr(err, "cause", None) or err.__cause__
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[-1] if lines and "Traceback" in lines[0] else (lines[0] if lines else "")
    if not with_type:
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def total_cpus() -> float:
    return sum(n.cpus for n in alive_nodes())
