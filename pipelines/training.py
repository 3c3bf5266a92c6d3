"""Distributed CAT-Seg fine-tuning on Ray Train (TorchTrainer).

The driver checks the inputs, builds the Ray Data training pipeline (read -> decode -> augment) and starts the
trainer; :func:`train_loop_per_worker` is the training loop every worker runs, written top to bottom like
nanoGPT's train.py: config, data, model, optimizer, resume, loop (forward, loss, backward, clip, step),
evaluation, checkpoint. Ray adds ``prepare_model``, the dataset shard and ``ray.train.report``.

A checkpoint is a directory ``STORAGE/RUN_NAME/step_NNNNNNNN/`` with
    model/config.json, model/model.safetensors   catseg.save_model format, loadable by catseg.load_model
    training_state.pt                           optimizer, scheduler, step, per-rank RNG state: tensors and
                                                 primitives only, read back with torch.load(weights_only=True)
    progress.json                               step and last metrics, for people and scripts
Re-running with the same storage path and run name resumes from the latest one; FailureConfig(max_failures)
restarts the worker group from it after a worker dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import catseg
from catseg import BASE_LR, CLIP_LR_MULTIPLIER, GRAD_CLIP_NORM, IGNORE_INDEX, WEIGHT_DECAY
from pipelines import cluster, storage
from pipelines.augment import resize_for_eval
from pipelines.datasets import (
    LAYOUTS,
    SegmentationDataset,
    SplitNotFoundError,
    check_dataset_label_ids,
    check_files_exist,
    holdout_split,
    load_dataset,
    read_example,
    read_manifest,
    training_pipeline,
)
from pipelines.metrics import compute_metrics
from pipelines.models import resolve_model
from pipelines.workers import cpu_worker_runtime_env

MODEL_DIR = "model"
DATA_PIPELINE_CPUS = 1.0  # load_training_batch tasks take 1 CPU (datasets.training_pipeline)
MIN_WORKER_CPUS = 0.1  # below this a worker's torch threads would crawl
TRAINING_STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
CHECKPOINT_PREFIX = "step_"
# Layout -> (training split, validation split) folder names.
logger = logging.getLogger(__name__)  # in Ray Train workers the root logger reaches the driver (print shows twice)
LAYOUT_SPLITS = {
    "cocostuff": ("train2017", "val2017"),
    "ade20k": ("training", "validation"),
    "manifest": ("train", "val"),
}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the defaults are the paper's solver settings."""

    data: str  # dataset root (cocostuff, ade20k) or manifest file (manifest)
    layout: str  # one of LAYOUTS
    storage: str  # RunConfig.storage_path: s3://bucket/prefix or a local folder
    run_name: str  # same name + same storage = resume
    model: str | None = "vit_b16"  # architecture; None = taken from init_checkpoint
    classes: str | None = None  # class-names file (manifest layout)
    clip_pretrained: str | None = None  # open_clip tag or CLIP weights URI for a fresh model
    init_checkpoint: str | None = None  # start from these weights (catseg.load_model URI)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1, less on a fixed cluster that would leave the data no CPU
    max_steps: int = 80_000
    batch_size_per_worker: int = 4
    crop_size: int = 384
    lr: float = BASE_LR
    weight_decay: float = WEIGHT_DECAY
    clip_lr_multiplier: float = CLIP_LR_MULTIPLIER
    grad_clip_norm: float = GRAD_CLIP_NORM
    eval_every: int = 5000  # 0 = no periodic validation (the last step is still evaluated unless 0)
    checkpoint_every: int = 1000  # the last step always gets a checkpoint
    log_every: int = 20
    max_val_images: int = 100  # evenly spaced subset of the validation split used for the periodic mIoU
    val_fraction: float = 0.05  # held out of the training pairs when the layout has no validation split
    max_failures: int = 3
    keep_checkpoints: int = 3
    bf16: bool = False  # autocast to bfloat16 on GPU (ignored on CPU)
    seed: int = 0
    stall_warning_minutes: float = 5.0  # log when no training batch arrived for this long

    def validate(self) -> None:
        """Refuse bad settings before anything is read or started."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown dataset layout {self.layout!r}; choose one of {list(LAYOUTS)}")
        if self.layout == "manifest" and not self.classes:
            raise ValueError("layout 'manifest' needs a class-names file: --classes FILE (one name per line)")
        if self.model is None and self.init_checkpoint is None:
            raise ValueError("give --model or --init-checkpoint (the architecture comes from one of them)")
        if self.model is not None and self.model not in catseg.list_models():
            raise ValueError(f"unknown model {self.model!r}; choose one of {catseg.list_models()}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run name must be a non-empty name without '/', got {self.run_name!r}")
        positive = ("num_workers", "max_steps", "batch_size_per_worker", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "max_failures", "max_val_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 32 <= self.crop_size <= 1024:
            raise ValueError(f"crop size must be in 32..1024 pixels, got {self.crop_size}")
        if self.lr <= 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            raise ValueError("lr and cpus_per_worker must be positive")
        if self.bf16 and not self.use_gpu:
            raise ValueError("--bf16 autocast is for GPU training; add --use-gpu or drop --bf16")


# ---------------------------------------------------------------------------------------------------------------
# Driver side: inputs, data, trainer


def prepare_datasets(config: FinetuneConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, validation) for the run, checked: files present, label ids covered by the class names.

    Validation is the layout's validation split (val2017, validation, manifest rows with split=val) when present,
    else a stable hash-based hold-out of ``val_fraction`` of the training pairs. None when eval_every is 0.
    """
    train_split, val_split = LAYOUT_SPLITS[config.layout]
    if config.layout == "manifest":
        has_splits = "split" in read_manifest(config.data).column_names
        train = load_dataset("manifest", config.data, train_split if has_splits else None, config.classes)
        val = load_dataset("manifest", config.data, val_split, config.classes) if has_splits else None
    else:
        train = load_dataset(config.layout, config.data, train_split)
        try:
            val = load_dataset(config.layout, config.data, val_split)
        except SplitNotFoundError:  # no validation folder: hold some training pairs out instead
            val = None
    if len(train) == 0:
        raise ValueError(f"{config.data} holds no training pairs")
    if config.eval_every == 0:
        val = None
    elif val is None or len(val) == 0:
        train, val = holdout_split(train, config.val_fraction)
    if val is not None and len(val) > config.max_val_images > 0:
        keep = np.linspace(0, len(val) - 1, config.max_val_images).round().astype(int)
        val = val.subset(sorted(set(keep.tolist())))
    for dataset in (train, val) if val is not None else (train,):
        check_files_exist(dataset)
        check_dataset_label_ids(dataset)
    global_batch = config.num_workers * config.batch_size_per_worker
    if len(train) < global_batch:
        raise ValueError(
            f"{len(train)} training pairs cannot fill one global batch of {global_batch} "
            f"({config.num_workers} workers x {config.batch_size_per_worker}); use fewer workers or a smaller batch"
        )
    return train, val


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
    worker_cpus = plan_worker_cpus(config)
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
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=callbacks,
            worker_runtime_env=cpu_worker_runtime_env(1 if config.use_gpu else 0),
        ),
        datasets={"train": training_pipeline(train, config.crop_size)},
    )
    return trainer.fit()


def plan_worker_cpus(config: FinetuneConfig) -> float:
    """CPUs per training worker, so that the workers and the data pipeline can all run.

    The data pipeline (shuffle, then read/decode/augment tasks of 1 CPU each) needs a CPU of its own: workers
    that take every CPU of a cluster that cannot grow wait for batches forever. The default is 1 CPU per worker,
    lowered on such a cluster to share what the data pipeline leaves (2 workers on 2 CPUs: 0.5 each); explicit
    numbers that leave the pipeline nothing are refused. A cluster with an autoscaler keeps the numbers given.
    """
    gpus = 1.0 if config.use_gpu else 0.0
    total = cluster.total_cpus()
    free = total - DATA_PIPELINE_CPUS
    if config.cpus_per_worker is not None:
        cpus = config.cpus_per_worker
        if not cluster.can_grow() and config.num_workers * cpus > free:
            raise cluster.UnschedulableError(
                f"--num-workers {config.num_workers} x --cpus-per-worker {cpus:g} take "
                f"{config.num_workers * cpus:g} of this Ray cluster's {total:g} CPUs and leave the data pipeline "
                f"less than the {DATA_PIPELINE_CPUS:g} it needs: lower --cpus-per-worker (at most "
                f"{max(free, 0) / config.num_workers:.2f}) or --num-workers, or leave --cpus-per-worker unset"
            )
    elif cluster.can_grow() or free >= config.num_workers:
        cpus = 1.0
    else:
        cpus = math.floor(100 * max(free, 0) / config.num_workers) / 100
        if cpus < MIN_WORKER_CPUS:
            raise cluster.UnschedulableError(
                f"{config.num_workers} training workers cannot share the {max(free, 0):g} CPUs that this Ray "
                f"cluster's {total:g} leave beside the data pipeline: lower --num-workers"
            )
        print(  # the job's own log: a default chosen for this machine is said, not hidden
            f"{config.num_workers} training workers x {cpus:g} CPU: {DATA_PIPELINE_CPUS:g} of this cluster's "
            f"{total:g} CPUs stay with the data pipeline (--cpus-per-worker sets it)",
            flush=True,
        )
    what = f"a training worker{' with a GPU' if gpus else ''}"
    cluster.require_node(cpus, gpus, what, "lower --cpus-per-worker" + (" or drop --use-gpu" if gpus else ""))
    return cpus


def checkpoint_uri(config: FinetuneConfig, checkpoint) -> str:
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


def load_eval_examples(
    pairs: list[tuple[str, str]], label_encoding: str, class_names: list[str], size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation pairs decoded and squashed to size x size."""
    examples = [read_example(image, label, label_encoding, len(class_names)) for image, label in pairs]
    return [resize_for_eval(image, label, size) for image, label in examples]


@torch.no_grad()
def evaluate_miou(
    model: catseg.CATSeg,
    examples: list[tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    device: torch.device,
    autocast: torch.autocast,
    batch_size: int = 4,
) -> float:
    """Mean IoU (detectron2's definition, as jobs.evaluate) of the confusion summed over every rank's examples.

    Eval mode (class-attention pooling 1, as at inference); whole image at the crop size. Every rank must call it.
    """
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    model.eval()
    text = model.embed_classes(class_names)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = torch.from_numpy(np.stack([image for image, _ in chunk])).to(device).permute(0, 3, 1, 2).float()
        labels = torch.from_numpy(np.stack([label for _, label in chunk])).to(device).long()
        with autocast:
            logits = model(images, text)
        predictions = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear").argmax(1)
        valid = labels != IGNORE_INDEX
        confusion += torch.bincount(labels[valid] * num_classes + predictions[valid], minlength=num_classes**2)
    model.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    return miou_from_confusion(confusion.view(num_classes, num_classes).cpu())


def miou_from_confusion(confusion: torch.Tensor) -> float:
    """confusion[true, predicted] -> mIoU as jobs.evaluate reports it (:func:`pipelines.metrics.compute_metrics`)."""
    return compute_metrics(confusion.numpy()).miou


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


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
