"""The assembled CAT-Seg model: CLIP features -> cost volume -> aggregation -> upsampling decoder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aggregator import CostAggregator, cost_volume
from .clip_backbone import CLIPBackbone
from .config import ModelConfig
from .decoder import UpsamplingDecoder
from .vocabulary import prompt_name, validate_vocabulary

# Logit given to classes dropped by the top-k truncation (T > pad_len), as in the reference.
TRUNCATED_LOGIT = -100.0

ClassesLike = Sequence[str] | torch.Tensor


class CATSeg(nn.Module):
    """Open-vocabulary segmentation: ``model(images, classes) -> logits B x T x 4h x 4w`` (96 x 96)."""

    def __init__(self, config: ModelConfig, clip_pretrained: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = CLIPBackbone(config, clip_pretrained)
        width, clip_dim = self.backbone.vision_width, self.backbone.embed_dim
        g0, g1 = config.decoder_guidance_dims
        # CLIP block outputs -> decoder guidance at 2x and 4x the patch grid
        self.upsample1 = nn.ConvTranspose2d(width, g0, kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(width, g1, kernel_size=4, stride=4)
        self.aggregator = CostAggregator(
            clip_dim=clip_dim,
            prompts=1,
            hidden_dim=config.hidden_dim,
            guidance_dim=config.guidance_proj_dim,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            resolution=self.backbone.grid_size,
            window=config.window_size,
            kernel=config.cost_embed_kernel,
            train_pooling=config.train_pooling,
            pad_len=config.pad_len,
        )
        self.decoder = UpsamplingDecoder(
            config.hidden_dim,
            config.decoder_dims,
            config.decoder_guidance_dims,
            config.decoder_guidance_proj_dims,
        )
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def embed_classes(self, class_names: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalized text embeddings T x P x C (P = 1 prompt template) for a vocabulary."""
        names = validate_vocabulary(class_names)
        prompts = [self.config.prompt_template.format(prompt_name(n)) for n in names]
        tokens = self.backbone.tokenize(prompts).to(self.device)
        embeddings = torch.cat([self.backbone.encode_text(chunk) for chunk in tokens.split(batch_size)], dim=0)  # T x C
        return F.normalize(embeddings, dim=-1).unsqueeze(1)

    def text_embeddings(self, classes: ClassesLike) -> torch.Tensor:
        """Names or precomputed embeddings -> T x P x C on the model's device."""
        if isinstance(classes, torch.Tensor):
            if classes.ndim != 3 or classes.shape[-1] != self.backbone.embed_dim:
                raise ValueError(
                    f"class embeddings must be T x P x {self.backbone.embed_dim} (from model.embed_classes); "
                    f"got shape {tuple(classes.shape)}"
                )
            if classes.shape[0] == 0:
                raise ValueError("the vocabulary is empty: give at least one class")
            return classes.to(self.device)
        return self.embed_classes(classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float RGB 0..255, B x 3 x H x W -> CLIP-normalized B x 3 x S x S (bilinear resize)."""
        check_images(images)
        images = (images.to(self.device) - self.pixel_mean) / self.pixel_std
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (dense CLIP features B x C x h x w, decoder guidance [B x G0 x 2h x 2w, B x G1 x 4h x 4w])."""
        dense, (mid, late) = self.backbone.encode_image_dense(self.preprocess(images))
        return dense, [self.upsample1(mid), self.upsample2(late)]

    def forward(
        self,
        images: torch.Tensor,
        classes: ClassesLike,
        *,
        class_chunk: int | None = None,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Images float B x 3 x H x W in 0..255 (any size), class names or embeddings -> logits B x T x 4h x 4w.

        ``class_chunk`` runs the per-class parts (cost embedding, spatial aggregation, decoder) on that many
        classes at a time: same outputs, memory bounded by the chunk instead of the vocabulary.
        ``truncate=False`` keeps every class when T > pad_len instead of the reference's top-pad_len selection.
        """
        text = self.text_embeddings(classes)
        dense, guidance = self.encode_images(images)
        return self.segment(dense, guidance, text, class_chunk=class_chunk, truncate=truncate)

    def segment(
        self,
        dense: torch.Tensor,
        guidance: list[torch.Tensor],
        text: torch.Tensor,
        *,
        class_chunk: int | None = None,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Encoded images + text embeddings T x P x C -> logits B x T x 4h x 4w (see :meth:`forward`)."""
        if class_chunk is not None and class_chunk < 1:
            raise ValueError(f"class_chunk must be a positive number of classes, got {class_chunk}")
        batch, classes = dense.shape[0], text.shape[0]
        text = text.unsqueeze(0).expand(batch, -1, -1, -1)  # B x T x P x C
        kept = None
        pad_len = self.config.pad_len
        if truncate and pad_len > 0 and classes > pad_len:
            # The class attention sees at most pad_len classes: keep, per image, those whose best patch is the
            # most similar; the rest get TRUNCATED_LOGIT (reference behaviour).
            best = cost_volume(dense, text).amax(dim=(1, 3, 4))  # B x T
            kept = best.topk(pad_len, dim=1).indices.sort(dim=1).values  # B x pad_len
            text = torch.gather(text, 1, kept[:, :, None, None].expand(-1, -1, *text.shape[2:]))

        chunks = self.aggregator(dense, text, class_chunk=class_chunk)
        decoder_guidance = self.decoder.project_guidance(guidance)
        logits = None
        start = 0
        for i, chunk in enumerate(chunks):
            part = self.decoder(chunk, decoder_guidance)
            chunks[i] = None  # free each aggregated chunk once decoded
            if logits is None:
                logits = part.new_empty((batch, text.shape[1], *part.shape[2:]))
            logits[:, start : start + part.shape[1]] = part
            start += part.shape[1]
        if kept is None:
            return logits
        full = logits.new_full((batch, classes, *logits.shape[2:]), TRUNCATED_LOGIT)
        return full.scatter(1, kept[:, :, None, None].expand(-1, -1, *logits.shape[2:]), logits)

    def segment_streamed(
        self, dense: torch.Tensor, guidance: list[torch.Tensor], text: torch.Tensor, *, class_chunk: int
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """:meth:`segment` with ``truncate=False``, one class chunk of logits (B x t x 4h x 4w) at a time, in class
        order: memory does not grow with the vocabulary (see :meth:`CostAggregator.stream`); the logits are those
        of :meth:`segment` with the same ``class_chunk``."""
        if class_chunk < 1:
            raise ValueError(f"class_chunk must be a positive number of classes, got {class_chunk}")
        text = text.unsqueeze(0).expand(dense.shape[0], -1, -1, -1)  # B x T x P x C
        decoder_guidance = self.decoder.project_guidance(guidance)
        for part, chunk in self.aggregator.stream(dense, text, class_chunk):
            yield part, self.decoder(chunk, decoder_guidance)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor B x 3 x H x W, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a float tensor with values in 0..255, got {images.dtype}; convert with images.float()"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be B x 3 x H x W (RGB, channels first), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
