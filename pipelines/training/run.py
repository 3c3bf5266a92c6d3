"""Distributed CAT-Seg fine-tuning on Ray Train (TorchTrainer).

The driver checks the inputs, builds the Ray Data training pipeline (read -> decode -> augment) and starts the
trainer; :func:`train_loop_per_worker` is the training loop every worker runs, written top to bottom like
nanoGPT's train.py: config, data, model, optimizer, resume, loop (forward, loss, backward, clip, step),
evaluation, checkpoint. Ray adds ``prepare_model``, the dataset shard and ``ray.train.report``.

Checkpoints (layout, writing, resume) are in :mod:`pipelines.training.checkpoints`, validation in
:mod:`pipelines.training.validation`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import catseg
from catseg import IGNORE_INDEX
from pipelines import cluster, storage
from pipelines.models import resolve_model
from pipelines.pairs import SegmentationDataset
from pipelines.training.checkpoints import (
    MODEL_DIR,
    load_training_state,
    report_with_checkpoint,
)
from pipelines.training.config import FinetuneConfig
from pipelines.training.datasets import training_pipeline
from pipelines.training.sources import prepare_datasets
from pipelines.training.validation import evaluate_miou, load_eval_examples
from pipelines.workers import cpu_worker_runtime_env, plan_training_worker_cpus

logger = logging.getLogger(__name__)  # in Ray Train workers the root logger reaches the driver (print shows twice)


# ---------------------------------------------------------------------------------------------------------------
# Driver side: inputs, data, trainer


def check_inputs(config: FinetuneConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Every up-front check, cheapest first: settings, storage writable, init checkpoint, datasets."""
    config.validate()
    storage.check_writable(storage.join(config.storage, config.run_name))
    if config.init_checkpoint:
        _check_init_checkpoint(config)
    return prepare_datasets(config)


def _check_init_checkpoint(config: FinetuneConfig) -> None:
    """Released name, checkpoint, official .pth or fine-tuning run: checked (not loaded) and resolved in place."""
    source = resolve_model(checkpoint=config.init_checkpoint)
    if config.model is not None and source.architecture != config.model:
        raise ValueError(
            f"--init-checkpoint {config.init_checkpoint} holds a {source.architecture!r} model "
            f"but --model is {config.model!r}"
        )
    config.init_checkpoint = source.uri


# Ray Train gives a worker group this long to start (its own default), then counts a retryable controller failure
WORKER_GROUP_START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_GROUP_START_TIMEOUT_S = 60.0


def worker_group_start_attempts() -> int:
    """Ray Train's ``controller_failure_limit`` for a bounded wait: a worker group that cannot start (its nodes
    lost, none joining) is retried for about RESOURCE_WAIT_SECONDS, then the run stops, instead of forever."""
    timeout = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_VARIABLE, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(1, math.ceil(cluster.RESOURCE_WAIT_SECONDS / max(timeout, 1.0)))


def run_finetuning(
    config: FinetuneConfig,
    datasets: tuple[SegmentationDataset, SegmentationDataset | None] | None = None,
    callbacks: list | None = None,
):
    """Fine-tune on the current Ray cluster; ``datasets`` from :func:`check_inputs` (checked here when None);
    ``callbacks``: ``ray.train.UserCallback`` objects (e.g. to record every report).

    Returns the ``ray.train.Result`` (``.checkpoint`` is the last one, ``.metrics`` the last report)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    train, val = datasets if datasets is not None else check_inputs(config)
    worker_cpus = plan_training_worker_cpus(config.num_workers, config.cpus_per_worker, config.use_gpu)
    loop_config = {
        **dataclasses.asdict(config),
        "class_names": train.class_names,
        "label_encoding": train.label_encoding,
        "val_pairs": [list(pair) for pair in val.pairs] if val is not None else [],
    }
    resources = {"CPU": worker_cpus, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            # Ray Train writes through pyarrow, which reads the same AWS_* variables (endpoint too) as s3fs.
            storage_path=config.storage,
            failure_config=ray.train.FailureConfig(
                max_failures=config.max_failures, controller_failure_limit=worker_group_start_attempts()
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=callbacks,
            worker_runtime_env=cpu_worker_runtime_env(1 if config.use_gpu else 0),
        ),
        datasets={"train": training_pipeline(train, config.crop_size)},
    )
    return trainer.fit()


# ---------------------------------------------------------------------------------------------------------------
# Worker side: the training loop


def cosine_schedule(max_steps: int):
    """LR multiplier: cosine from 1 to 0 over max_steps, no warm-up (the reference's WarmupCosineLR, 0 warm-up)."""

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))

    return factor


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # -- config -------------------------------------------------------------------------------------------------
    cfg = FinetuneConfig(**{f.name: config[f.name] for f in dataclasses.fields(FinetuneConfig)})
    class_names: list[str] = config["class_names"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank

    # -- model: resume checkpoint > init checkpoint > fresh build -----------------------------------------------
    resume = ray.train.get_checkpoint()
    resume_dir = resume.to_directory() if resume is not None else None  # a local copy for this worker
    if resume_dir is not None:
        model = catseg.load_model(os.path.join(resume_dir, MODEL_DIR))
    elif cfg.init_checkpoint:
        model = catseg.load_model(cfg.init_checkpoint)
        if cfg.model is not None and model.config.name != cfg.model:
            raise ValueError(f"{cfg.init_checkpoint} holds a {model.config.name!r} model, not {cfg.model!r}")
    else:
        model = catseg.build_model(cfg.model, clip_pretrained=cfg.clip_pretrained)
    torch.manual_seed(cfg.seed + rank)  # then a stream per rank
    catseg.configure_finetuning(model)
    model.train()
    # The last visual block runs in dense mode, so its (trainable) q projection gets no gradient.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    raw_model: catseg.CATSeg = model.module if hasattr(model, "module") else model

    # -- optimizer and schedule ---------------------------------------------------------------------------------
    groups = catseg.optimizer_param_groups(raw_model, cfg.lr, cfg.weight_decay, cfg.clip_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.max_steps))
    step = 0
    if resume_dir is not None:
        step = load_training_state(resume_dir, optimizer, scheduler, rank, world_size)
        shutil.rmtree(resume_dir, ignore_errors=True)
    start_step = step
    if rank == 0:
        origin = f"resumed from step {step}" if resume_dir else f"from {cfg.init_checkpoint or 'scratch'}"
        logger.info(f"{cfg.run_name}: {raw_model.config.name}, {len(class_names)} classes, {origin}")

    # -- data ---------------------------------------------------------------------------------------------------
    train_shard = ray.train.get_dataset_shard("train")
    val_pairs = [tuple(p) for p in config["val_pairs"]][rank::world_size]  # each rank scores its slice
    val_examples: list[tuple[np.ndarray, np.ndarray]] | None = None

    # -- loop ---------------------------------------------------------------------------------------------------
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    metrics: dict[str, Any] = {"step": step, "resumed_from_step": start_step}
    while step < cfg.max_steps:
        epoch_start_step = step
        batches = train_shard.iter_torch_batches(batch_size=cfg.batch_size_per_worker, drop_last=True)
        for batch in warn_when_stalled(batches, 60 * cfg.stall_warning_minutes, f"rank {rank}, step {step}"):
            images = batch["image"].to(device).permute(0, 3, 1, 2).float()  # B x 3 x S x S, 0..255
            labels = batch["label"].to(device).long()  # B x S x S, 255 = ignore
            with autocast:
                logits = model(images, class_names)  # B x T x 96 x 96
            loss = catseg.segmentation_loss(logits.float(), labels, IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            window_loss += loss.item()
            window_steps += 1

            # Every rank takes the same branches at the same steps, so all report equally often.
            is_last = step >= cfg.max_steps
            do_eval = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or is_last)
            do_checkpoint = step % cfg.checkpoint_every == 0 or is_last
            if not (do_eval or do_checkpoint or step % cfg.log_every == 0):
                continue
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "loss": _mean_over_ranks(window_loss / window_steps, device),
                "lr": max(scheduler.get_last_lr()),  # the head's lr (CLIP runs at x clip_lr_multiplier)
                "images_per_s_per_worker": window_steps * cfg.batch_size_per_worker / elapsed,
                "resumed_from_step": start_step,
            }
            if do_eval:
                if val_examples is None:  # decoded once, kept for every later evaluation
                    val_examples = load_eval_examples(val_pairs, config["label_encoding"], class_names, cfg.crop_size)
                metrics["val_miou"] = evaluate_miou(raw_model, val_examples, class_names, device, autocast)
            if rank == 0:
                logger.info(format_progress(metrics, cfg.max_steps, world_size))
            if do_checkpoint:
                report_with_checkpoint(raw_model, optimizer, scheduler, metrics, rank, world_size)
            else:
                ray.train.report(metrics)
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if is_last:
                break
        if step == epoch_start_step:
            raise RuntimeError("an epoch of the training data yielded no full batch; see the skipped-file warnings")
    if step == start_step:  # nothing left to train (the run had finished): report once so the run has metrics
        ray.train.report(metrics)


def warn_when_stalled(batches: Any, seconds: float, where: str) -> Any:
    """Yield from ``batches``; log a warning each time ``seconds`` pass while waiting for the next one.

    A data pipeline starved of CPUs, or storage that stopped answering, otherwise leaves a run silent forever.
    Time spent by the caller between batches (the training step) does not count.
    """
    waiting_since: list[float | None] = [time.monotonic()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(min(seconds, 30.0)):
            since = waiting_since[0]
            if since is not None and time.monotonic() - since >= seconds:
                logger.warning(
                    f"no training batch for {(time.monotonic() - since) / 60:.1f} min ({where}): the data pipeline "
                    "is stalled; check that the workers leave it CPUs (--cpus-per-worker) and that the data "
                    "storage answers"
                )
                waiting_since[0] = time.monotonic()

    threading.Thread(target=watch, name="stall-watch", daemon=True).start()
    try:
        for batch in batches:
            waiting_since[0] = None
            yield batch
            waiting_since[0] = time.monotonic()
    finally:
        done.set()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def format_progress(metrics: dict[str, Any], max_steps: int, world_size: int) -> str:
    per_worker = metrics["images_per_s_per_worker"]
    line = (
        f"step {metrics['step']}/{max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.3e} | "
        f"{per_worker * world_size:.2f} images/s ({per_worker:.2f} per worker)"
    )
    if "val_miou" in metrics:
        line += f" | val mIoU {metrics['val_miou']:.3f}"
    return line
