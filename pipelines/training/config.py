"""A fine-tuning run's settings (:class:`FinetuneConfig`) and the dataset layouts it reads (:data:`LAYOUTS`)."""

from __future__ import annotations

from dataclasses import dataclass

import catseg
from catseg import BASE_LR, CLIP_LR_MULTIPLIER, GRAD_CLIP_NORM, WEIGHT_DECAY
from pipelines.training.feedback import FEEDBACK_LAYOUTS, TrainingSource

LAYOUTS = ("cocostuff", "ade20k", "manifest", *FEEDBACK_LAYOUTS)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the defaults are the paper's solver settings."""

    data: str  # dataset root (cocostuff, ade20k), manifest, Label Studio / COCO export, or labelling run
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
    weight: float = 1.0  # the --data source's weight against the --add-source ones
    add_source: tuple[str, ...] | list[str] | None = None  # more sources: LAYOUT=URI[,weight=W]
    where: str | None = None  # labels sources: SQL condition on the run's table `labels`
    min_confidence: float | None = None  # labels sources: pixels below this probability are ignored
    label_studio_url: str | None = None  # label-studio sources: where /data/upload/... images are fetched
    local_files_root: str | None = None  # label-studio sources: LOCAL_FILES_DOCUMENT_ROOT for /data/local-files/
    stall_warning_minutes: float = 5.0  # log when no training batch arrived for this long

    def validate(self) -> None:
        """Refuse bad settings before anything is read or started."""
        layouts = [self.layout, *(TrainingSource.parse(text).layout for text in self.add_source or ())]
        for layout in layouts:
            if layout not in LAYOUTS:
                raise ValueError(f"unknown dataset layout {layout!r}; choose one of {list(LAYOUTS)}")
        if "manifest" in layouts and not self.classes:
            raise ValueError("layout 'manifest' needs a class-names file: --classes FILE (one name per line)")
        if self.weight < 0:
            raise ValueError(f"--weight must be >= 0, got {self.weight}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if (self.where or self.min_confidence is not None) and "labels" not in layouts:
            raise ValueError("--where and --min-confidence choose a labelling run's rows: they need a labels source")
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
