"""CLIP image and text encoders (open_clip) with CAT-Seg's dense image features.

Two changes to the stock open_clip model, both as in the reference implementation:
- every attention layer keeps q, k and v input projections as separate parameters, so fine-tuning can train
  q and v alone (``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``, the reference's key names);
- the image encoder runs its last block in "dense" mode (no attention: each token gets the value projection
  plus the CLS token as residual), which yields one CLIP embedding per patch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .config import OPEN_CLIP_CONFIG_DIR, ModelConfig


class SplitQKVAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projection weights; drop-in for open_clip's blocks."""

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        if not source.batch_first:
            raise ValueError("open_clip attention layers are expected to be batch_first")
        self.num_heads = source.num_heads
        q, k, v = source.in_proj_weight.detach().chunk(3, dim=0)
        self.q_proj_weight = nn.Parameter(q.clone())
        self.k_proj_weight = nn.Parameter(k.clone())
        self.v_proj_weight = nn.Parameter(v.clone())
        self.in_proj_bias = nn.Parameter(source.in_proj_bias.detach().clone())
        self.out_proj = nn.Linear(source.embed_dim, source.embed_dim)
        self.out_proj.load_state_dict(source.out_proj.state_dict())

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """out_proj(v_proj(x)): the dense path of the last visual block."""
        v_bias = self.in_proj_bias.chunk(3)[2]
        return self.out_proj(F.linear(x, self.v_proj_weight, v_bias))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        # open_clip calls attn(x, x, x, need_weights=False, attn_mask=mask); self-attention only.
        q_bias, k_bias, v_bias = self.in_proj_bias.chunk(3)
        batch, length, dim = query.shape
        heads = self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # B x L x D -> B x heads x L x D/heads
            return t.view(batch, length, heads, dim // heads).transpose(1, 2)

        q = split_heads(F.linear(query, self.q_proj_weight, q_bias))
        k = split_heads(F.linear(query, self.k_proj_weight, k_bias))
        v = split_heads(F.linear(query, self.v_proj_weight, v_bias))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out), None


@lru_cache(maxsize=1)
def _register_open_clip_configs() -> None:
    open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)


def _split_attention_layers(clip: nn.Module) -> None:
    for tower in (clip.visual.transformer, clip.transformer):
        for block in tower.resblocks:
            block.attn = SplitQKVAttention(block.attn)


def _resolve_clip_weights(clip_pretrained: str) -> str:
    """A tag stays a tag; a path or fsspec URI becomes a local file open_clip can read."""
    if os.path.exists(clip_pretrained):
        return clip_pretrained
    if "://" not in clip_pretrained:
        if "/" in clip_pretrained or clip_pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise FileNotFoundError(f"CLIP weights file not found: {clip_pretrained}")
        return clip_pretrained  # an open_clip pretrained tag such as "openai"
    import fsspec

    suffix = ".safetensors" if clip_pretrained.endswith(".safetensors") else ".pt"
    fd, local = tempfile.mkstemp(prefix="catseg-clip-", suffix=suffix)
    try:
        with fsspec.open(clip_pretrained, "rb") as remote, os.fdopen(fd, "wb") as out:
            while chunk := remote.read(64 << 20):
                out.write(chunk)
    except FileNotFoundError as err:
        os.unlink(local)
        raise FileNotFoundError(f"CLIP weights not found at {clip_pretrained}") from err
    return local


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    root = logging.getLogger()
    log_filter = _RandomInitWarningFilter()
    root.addFilter(log_filter)
    try:
        yield
    finally:
        root.removeFilter(log_filter)


def create_clip(config: ModelConfig, clip_pretrained: str | None = None) -> nn.Module:
    """The open_clip model for ``config``, with split q/k/v attention. Random init unless ``clip_pretrained``."""
    _register_open_clip_configs()
    device = torch.empty(0).device  # honours a `with torch.device("meta"):` context (shape-only builds)
    if clip_pretrained is None:
        # Random init is what we asked for (weights come from our checkpoint next): open_clip's root-logger
        # warning that no pretrained weights were loaded would be noise in every job's log.
        with _without_random_init_warning():
            clip = open_clip.create_model(config.clip_model, pretrained=None, device=device)
    else:
        source = _resolve_clip_weights(clip_pretrained)
        try:
            clip = open_clip.create_model(config.clip_model, pretrained=source, require_pretrained=True)
        except Exception as err:  # open_clip raises several types for offline / unknown tags
            raise RuntimeError(
                f"could not load CLIP weights {clip_pretrained!r} for {config.clip_model}: {err}. "
                "Without internet access, pass a local or s3:// CLIP weights file, or a CAT-Seg "
                "checkpoint with --checkpoint."
            ) from err
        finally:
            if source != clip_pretrained:
                os.unlink(source)
    _split_attention_layers(clip)
    return clip.float()


@lru_cache(maxsize=8)
def _tokenizer(clip_model: str):
    _register_open_clip_configs()
    return open_clip.get_tokenizer(clip_model)


class CLIPBackbone(nn.Module):
    """Dense image features plus intermediate block outputs, and prompt-template text embeddings."""

    def __init__(self, config: ModelConfig, clip_pretrained: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = create_clip(config, clip_pretrained)
        visual = self.clip.visual
        self.patch_size = visual.conv1.kernel_size[0]
        self.grid_size = config.input_size // self.patch_size
        self.vision_width = visual.conv1.out_channels
        self.embed_dim = visual.proj.shape[1]
        num_blocks = len(visual.transformer.resblocks)
        if not all(0 <= i < num_blocks - 1 for i in config.feature_layers):
            raise ValueError(f"feature_layers {config.feature_layers} must index blocks 0..{num_blocks - 2}")

    def positional_embedding(self) -> torch.Tensor:
        """CLIP's positional embedding resized (bicubic) to this model's patch grid; CLS position kept."""
        pos = self.clip.visual.positional_embedding  # (1 + S*S) x W
        side = round((pos.shape[0] - 1) ** 0.5)
        if side == self.grid_size:
            return pos
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # 1 x W x S x S
        grid = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.flatten(2).squeeze(0).T], dim=0)

    def encode_image_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalized images B x 3 x S x S -> (dense features B x C x g x g, [block outputs B x W x g x g])."""
        visual = self.clip.visual
        x = visual.conv1(images)  # B x W x g x g
        batch, width, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x g*g x W
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding().to(x.dtype)
        x = visual.ln_pre(x)

        blocks = visual.transformer.resblocks
        intermediates = []
        for i, block in enumerate(blocks[:-1]):
            x = block(x)
            if i in self.config.feature_layers:
                intermediates.append(x[:, 1:].transpose(1, 2).reshape(batch, width, gh, gw))

        last = blocks[-1]
        v = last.attn.value(last.ln_1(x)) + x[:, :1]  # dense mode: no attention, CLS as residual
        v = v + last.mlp(last.ln_2(v))
        dense = visual.ln_post(v) @ visual.proj  # not L2-normalized
        dense = dense[:, 1:].transpose(1, 2).reshape(batch, -1, gh, gw)
        return dense, intermediates

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return _tokenizer(self.config.clip_model)(prompts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)
