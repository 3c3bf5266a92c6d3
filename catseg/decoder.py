"""Upsampling decoder: two guided 2x upsampling stages and a 1-channel head, applied to each class map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .aggregator import add_residual


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(Conv3x3 without bias -> GroupNorm(out/16) -> ReLU) twice."""
    groups = max(out_channels // 16, 1)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class GuidedUp(nn.Module):
    """2x transposed convolution, concatenated with projected CLIP guidance, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = double_conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x: (B*T) x C x h x w, class maps ordered image-major; guidance: B x G x 2h x 2w -> (B*T) x out x 2h x 2w.

        The first convolution of ``concat(x, guidance)`` is split into its x and guidance input channels: the
        guidance half is computed once per image and added to every class map, never repeated T times.
        """
        x = self.up(x)
        first = self.conv[0]
        width = x.shape[1]
        y = F.conv2d(x, first.weight[:, :width], padding=first.padding)
        guided = F.conv2d(guidance, first.weight[:, width:], padding=first.padding)  # B x out x 2h x 2w
        y = add_residual(y.view(guidance.shape[0], -1, *y.shape[1:]), guided.unsqueeze(1))
        return self.conv[1:](y.flatten(0, 1))


class UpsamplingDecoder(nn.Module):
    def __init__(
        self,
        hidden_dim: int,
        decoder_dims: tuple[int, int],
        guidance_dims: tuple[int, int],
        guidance_proj_dims: tuple[int, int],
    ) -> None:
        super().__init__()
        self.guidance_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(g, p, kernel_size=3, padding=1), nn.ReLU())
            for g, p in zip(guidance_dims, guidance_proj_dims, strict=True)
        )
        self.up1 = GuidedUp(hidden_dim, decoder_dims[0], guidance_proj_dims[0])
        self.up2 = GuidedUp(decoder_dims[0], decoder_dims[1], guidance_proj_dims[1])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, padding=1)

    def project_guidance(self, guidance: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(g) for proj, g in zip(self.guidance_proj, guidance, strict=True)]

    def forward(self, x: torch.Tensor, projected_guidance: list[torch.Tensor]) -> torch.Tensor:
        """x: B x D x T x h x w; projected guidance at 2h and 4h -> logits B x T x 4h x 4w."""
        batch = x.shape[0]
        # channels-last (NHWC) convolutions run about 1.5x faster on CPU (oneDNN's native layout) and use
        # tensor cores on GPU; the aggregator's output is already stored channels-last, so this costs no copy
        y = rearrange(x, "b d t h w -> (b t) d h w").contiguous(memory_format=torch.channels_last)
        guidance = [g.contiguous(memory_format=torch.channels_last) for g in projected_guidance]
        y = self.up1(y, guidance[0])
        y = self.up2(y, guidance[1])
        y = self.head(y)
        return rearrange(y, "(b t) 1 h w -> b t h w", b=batch)
