"""Joining a Ray cluster, and refusing up front what it can never run.

A job without ``RAY_ADDRESS`` starts an embedded Ray on this machine: nothing can add nodes to it, so a request
no node can hold (``--num-gpus-per-actor 1`` on a CPU-only machine, more CPUs than it has, workers that leave the
data pipeline no CPU) would wait forever. Those are refused at once, in one line. On a cluster (``RAY_ADDRESS``,
as under ``ray job submit``) an autoscaler may add the node, so the job waits a bounded time, then gives up.
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

# How long a job on a cluster waits for a node that can hold its workers (autoscalers take minutes).
# The same bound applies mid-run, when the nodes that held the workers are lost (CapacityWatch).
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


class CapacityLostError(RuntimeError):
    """Mid-run, no live node could hold the pipeline's workers for RESOURCE_WAIT_SECONDS (e.g. every GPU node lost)."""


class CapacityWatch:
    """Mid-run counterpart of :func:`require_node`: a driver thread that checks every few seconds that some live
    node can hold one worker of ``cpus`` and ``gpus``. While none can it says so every minute (what it waits for,
    for how long, and ``progress()``, e.g. the rows committed); after RESOURCE_WAIT_SECONDS it interrupts the main
    thread (Ray Data would otherwise wait for the node forever), and the ``with`` block ends in
    :class:`CapacityLostError` (:meth:`check` raises it too). Nodes that exist but are busy count as capacity:
    Ray schedules onto them later.
    """

    POLL_SECONDS = 2.0
    REPORT_SECONDS = 60.0

    def __init__(self, what: str, cpus: float, gpus: float, progress: Callable[[], str] | None = None) -> None:
        self.what, self.cpus, self.gpus = what, cpus, gpus
        self.progress = progress
        self.wait_seconds = RESOURCE_WAIT_SECONDS
        self.expired: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _request(self) -> str:
        return f"{self.cpus:g} CPU" + (f" and {self.gpus:g} GPU" if self.gpus else "")

    def _has_capacity(self) -> bool:
        return any(n.cpus >= self.cpus and n.gpus >= self.gpus for n in alive_nodes())

    def _progress(self) -> str:
        if self.progress is None:
            return ""
        try:
            return f"; {self.progress()}"
        except Exception as err:  # progress is a courtesy: storage trouble must not stop the watch
            return f"; progress unknown ({one_line(err)})"

    def _watch(self) -> None:
        lost_since: float | None = None
        reported = 0.0
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                capacity = self._has_capacity()
            except Exception as err:  # the GCS restarting: not a verdict on the nodes
                logger.warning("could not read the cluster's nodes: %s", err)
                continue
            now = time.monotonic()
            if capacity:
                if lost_since is not None:
                    print(f"a node that can hold {self.what} is back after {now - lost_since:.0f} s", flush=True)
                lost_since = None
                continue
            if lost_since is None:
                lost_since, reported = now, now - self.REPORT_SECONDS  # say it at once, then every minute
            waited = now - lost_since
            if waited >= self.wait_seconds:
                self.expired = (
                    f"no live node could hold {self.what} ({self._request()}; nodes: {_describe(alive_nodes())}) "
                    f"for {self.wait_seconds:g} s (CATSEG_RESOURCE_WAIT_SECONDS){self._progress()}"
                )
                print(f"stopping: {self.expired}", flush=True)
                _thread.interrupt_main()
                return
            if now - reported >= self.REPORT_SECONDS:
                reported = now
                print(
                    f"waiting for a node that can hold {self.what} ({self._request()}): none for {waited:.0f} s, "
                    f"stopping after {self.wait_seconds:g} s{self._progress()}",
                    flush=True,
                )

    def check(self) -> None:
        if self.expired:
            raise CapacityLostError(self.expired)

    def __enter__(self) -> CapacityWatch:
        self._thread = threading.Thread(target=self._watch, name="catseg-capacity", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        """Stops the watch; when the watch interrupted the run, the interruption leaves as CapacityLostError."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(timeout=10)
        except KeyboardInterrupt as interrupt:  # the watch's own interruption, arriving while it is joined
            if not self.expired:
                raise
            exc = exc or interrupt
        if exc is not None and self.expired:
            raise CapacityLostError(self.expired) from exc
