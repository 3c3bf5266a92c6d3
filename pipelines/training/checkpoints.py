"""Fine-tuning checkpoints: their layout, writing and reading them, and where a re-run resumes.

A checkpoint is a directory ``STORAGE/RUN_NAME/step_NNNNNNNN/`` with
    model/config.json, model/model.safetensors   catseg.save_model format, loadable by catseg.load_model
    training_state.pt                           optimizer, scheduler, step, per-rank RNG state: tensors and
                                                 primitives only, read back with torch.load(weights_only=True)
    progress.json                               step and last metrics, for people and scripts
Re-running with the same storage path and run name resumes from the latest one; FailureConfig(max_failures)
restarts the worker group from it after a worker dies.

Which model directory a run or step URI means (for jobs that load a fine-tuned model) is
:func:`pipelines.models.resolve_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

import catseg
from pipelines import storage
from pipelines.models import CHECKPOINT_PREFIX, MODEL_DIR

TRAINING_STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"


def checkpoint_uri(config: Any, checkpoint: Any) -> str:
    """The URI of a reported checkpoint directory (ray's Checkpoint.path has no scheme)."""
    return storage.join(config.storage, config.run_name, os.path.basename(checkpoint.path.rstrip("/")))


def list_checkpoints(storage_uri: str, run_name: str) -> list[tuple[int, str]]:
    """(step, URI) of the complete checkpoint folders of a run, oldest first (a folder may be complete on
    storage yet not committed by Ray Train, if the run died while reporting it: see :func:`resume_point`)."""
    run_uri = storage.join(storage_uri, run_name)
    fs, path = storage.filesystem(run_uri)
    fs.invalidate_cache(path)  # s3fs caches listings; checkpoints appear while a run goes on
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        name = os.path.basename(entry.rstrip("/"))
        if name.startswith(CHECKPOINT_PREFIX) and fs.exists(f"{entry}/{PROGRESS_FILE}"):
            found.append((int(name[len(CHECKPOINT_PREFIX) :]), storage.join(run_uri, name)))
    return sorted(found)


def resume_point(storage_uri: str, run_name: str) -> tuple[int, str] | None:
    """(step, URI) of the checkpoint a re-run of this run would resume from, or None for a fresh start.

    Asks Ray Train (``ray.train.Result.from_path``): a checkpoint counts once Ray has committed it, not when its
    files land."""
    import ray.train

    run_uri = storage.join(storage_uri, run_name)
    fs, path = storage.filesystem(run_uri)
    fs.invalidate_cache(path)  # s3fs caches listings; checkpoints appear while a run goes on
    if not fs.exists(path):
        return None
    train_logger = logging.getLogger("ray.train")
    level = train_logger.level
    train_logger.setLevel(logging.WARNING)  # reading the record logs advice meant for starting a trainer
    try:
        checkpoint = ray.train.Result.from_path(run_uri).checkpoint
    except RuntimeError:  # a folder Ray Train has not recorded a checkpoint in (yet)
        return None
    finally:
        train_logger.setLevel(level)
    name = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else ""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    return int(name[len(CHECKPOINT_PREFIX) :]), storage.join(run_uri, name)


def report_with_checkpoint(
    model: catseg.CATSeg,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    metrics: dict[str, Any],
    rank: int,
    world_size: int,
) -> None:
    """Rank 0 writes the checkpoint and reports it; the others report the same metrics without one."""
    import ray.train

    rng_states = _gather_rng_states(world_size)  # a collective: every rank takes part
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="catseg-ckpt-") as directory:
        save_training_checkpoint(directory, model, optimizer, scheduler, metrics, rng_states)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{metrics['step']:08d}",
        )


def _gather_rng_states(world_size: int) -> list[dict[str, torch.Tensor]]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def save_training_checkpoint(
    directory: str,
    model: catseg.CATSeg,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    metrics: dict[str, Any],
    rng_states: list[dict[str, torch.Tensor]],
) -> None:
    catseg.save_model(model, os.path.join(directory, MODEL_DIR))
    state = {
        "step": int(metrics["step"]),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
    }
    torch.save(state, os.path.join(directory, TRAINING_STATE_FILE))
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:  # last: marks the checkpoint complete
        json.dump({**metrics, "model": model.config.name}, f, indent=2)


def load_training_state(
    directory: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    world_size: int,
) -> int:
    """Restore optimizer, scheduler and this rank's RNG state; returns the step to continue from."""
    state = torch.load(os.path.join(directory, TRAINING_STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state["rng"]
    if len(rng_states) == world_size:
        torch.set_rng_state(rng_states[rank]["torch"])
        if "cuda" in rng_states[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_states[rank]["cuda"])
    else:  # a different number of workers: per-rank streams cannot carry over; derive fresh ones
        torch.manual_seed(int(state["step"]) * 1000 + rank)
    return int(state["step"])
