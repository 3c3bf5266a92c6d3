"""What fine-tuning trains, with which optimizer settings, and the loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import CATSeg

IGNORE_INDEX = 255

# Reference solver settings (vitb_384.yaml / vitl_336.yaml).
BASE_LR = 2e-4
WEIGHT_DECAY = 1e-4
CLIP_LR_MULTIPLIER = 0.01
GRAD_CLIP_NORM = 0.01

_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding)
_CLIP_TRAINABLE = ("attn.q_proj_weight", "attn.v_proj_weight")


def configure_finetuning(model: CATSeg) -> list[str]:
    """Freeze everything but the q and v projections of every CLIP attention layer (image and text encoders),
    the two guidance upsampling layers, the aggregator and the decoder. Returns the trainable names."""
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            param.requires_grad_(name.endswith(_CLIP_TRAINABLE))
        else:
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def optimizer_param_groups(
    model: nn.Module,
    lr: float = BASE_LR,
    weight_decay: float = WEIGHT_DECAY,
    clip_lr_multiplier: float = CLIP_LR_MULTIPLIER,
) -> list[dict[str, Any]]:
    """AdamW groups as in the reference: CLIP at lr x0.01, no weight decay on norms and embeddings.

    Works on a wrapped model too (DistributedDataParallel's ``module.`` prefix)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_clip = "backbone." in f"{module_name}."
            group_lr = lr * clip_lr_multiplier if is_clip else lr
            decay = 0.0 if isinstance(module, _NO_DECAY_MODULES) else weight_decay
            groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": params, "lr": g_lr, "weight_decay": decay} for (g_lr, decay), params in groups.items()]


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-pixel binary cross-entropy over all classes against one-hot targets.

    logits: B x T x h x w (upsampled bilinearly to the targets' size); targets: B x H x W class indices.
    Ignored pixels get an all-zero target and stay in the mean, as in the reference.
    """
    if targets.ndim != 3:
        raise ValueError(f"targets must be B x H x W class indices, got shape {tuple(targets.shape)}")
    classes = logits.shape[1]
    targets = targets.long()
    labelled = targets != ignore_index
    if labelled.any() and (targets[labelled].min() < 0 or targets[labelled].max() >= classes):
        raise ValueError(
            f"targets hold class ids outside 0..{classes - 1} (and are not the ignore value {ignore_index})"
        )
    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    one_hot = F.one_hot(targets.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).to(logits.dtype)
    one_hot = one_hot * labelled.unsqueeze(1)
    return F.binary_cross_entropy_with_logits(logits, one_hot)
