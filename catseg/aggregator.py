"""Cost volume and cost aggregation: spatial (Swin windows per class map) then class (linear attention per pixel).

Shapes: B images, T classes, P prompt templates, C CLIP embedding width, D hidden width, G guidance width,
h x w the CLIP patch grid (24 x 24).

Guidance enters attention as ``Linear(concat(x, g))``. The linear map is split into its x and g column blocks
so the guidance term is computed once per image (spatial) or once per class (class attention) and broadcast,
instead of materializing the guidance repeated over every class or pixel: same function, bounded memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def cost_volume(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every class prompt: (B,C,h,w), (B,T,P,C) -> (B,P,T,h,w)."""
    image_features = F.normalize(image_features, dim=1)
    text_features = F.normalize(text_features, dim=-1)
    return torch.einsum("bchw,btpc->bpthw", image_features, text_features)


# Rows (pixels x class maps) per block of the per-row parts (Swin blocks, MLPs) at CPU inference: a block's widest
# activation (the MLP's 4 x 128 floats per row) then fits in the core's cache, about 10% faster than whole chunks
# on the vit_b16 forward. Results are the same row for row; on GPUs and in training whole chunks run at once.
CPU_BLOCK_ROWS = 2048


def cache_block(x: torch.Tensor, items: int, rows_per_item: int) -> int:
    """How many of ``items`` (of ``rows_per_item`` rows each) to process at a time: all but at CPU inference."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return items
    return max(1, CPU_BLOCK_ROWS // rows_per_item)


def add_residual(fresh: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + fresh``, added in place into ``fresh`` (a result no one else holds; autograd saves neither
    operand of an addition) when its dtype holds the sum: one pass over memory instead of a new tensor. The same
    floats, since addition commutes; under autocast a sum that promotes is computed out of place, as before."""
    if torch.promote_types(fresh.dtype, residual.dtype) == fresh.dtype:
        return fresh.add_(residual)
    return fresh + residual


def residual_mlp(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> torch.Tensor:
    """``x + mlp(norm(x))`` over the last dim, in cache-sized blocks of rows at CPU inference."""
    rows = x.shape[:-1].numel()
    step = cache_block(x, rows, 1)
    if step >= rows:
        return add_residual(mlp(norm(x)), x)
    flat = x.reshape(rows, x.shape[-1])
    out = None
    for start in range(0, rows, step):
        part = flat[start : start + step]
        block = add_residual(mlp(norm(part)), part)
        if out is None:
            out = flat.new_empty(flat.shape, dtype=block.dtype)
        out[start : start + step] = block
    return out.view(x.shape)


def guidance_share(layer: nn.Linear, guidance: torch.Tensor) -> torch.Tensor:
    """The guidance's share of ``layer(concat(x, guidance))``: the guidance through the weight's last columns."""
    return F.linear(guidance, layer.weight[:, layer.in_features - guidance.shape[-1] :])


def linear_with_share(layer: nn.Linear, x: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
    """``layer(concat(x, guidance))`` given the guidance's :func:`guidance_share`, broadcastable against x."""
    out = F.linear(x, layer.weight[:, : x.shape[-1]], layer.bias)
    return out if share is None else out + share


def guided_linear(layer: nn.Linear, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """``layer(concat(x, guidance))`` with ``guidance`` broadcastable against ``x`` in all but the last dim."""
    return linear_with_share(layer, x, None if guidance is None else guidance_share(layer, guidance))


class WindowAttention(nn.Module):
    """Softmax attention inside windows; q and k see the guidance, v does not. No relative position bias."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def guidance_terms(self, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guidance's share of q and k (:func:`guidance_share`), for windows of guidance ... x nW x L x G:
        computed once per image and added to every class map's projections."""
        return guidance_share(self.q, guidance), guidance_share(self.k, guidance)

    def forward(
        self, x: torch.Tensor, guidance_terms: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: ... x nW x L x D windows; guidance_terms (:meth:`guidance_terms`) broadcastable to x; mask: nW x L x L."""
        *lead, windows, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q_share, k_share = guidance_terms if guidance_terms is not None else (None, None)
        q, k, v = linear_with_share(self.q, x, q_share), linear_with_share(self.k, x, k_share), self.v(x)
        # 4-D calls take the fused attention kernels (a 5-D call falls back to the unfused math path on CPU,
        # ~3x slower). Unmasked: windows are the batch, heads a strided view (no copy). Masked: windows and
        # heads share one axis (N x nW*heads x L x d, one copy) so the nW x L x L mask broadcasts over N.
        if mask is None:
            q, k, v = (t.reshape(-1, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        else:
            q, k, v = (
                t.reshape(-1, windows, length, heads, head_dim)
                .transpose(2, 3)
                .reshape(-1, windows * heads, length, head_dim)
                for t in (q, k, v)
            )
            mask = mask.unsqueeze(1).expand(-1, heads, -1, -1).reshape(1, windows * heads, length, length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.view(-1, windows, heads, length, head_dim).transpose(2, 3)
        return self.proj(out.reshape(*lead, windows, length, dim))


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (-100 across regions that a cyclic shift made adjacent), nW x window² x window²."""
    regions = torch.zeros(height, width)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[hs, ws] = label
            label += 1
    windows = rearrange(regions, "(nh a) (nw b) -> (nh nw) (a b)", a=window, b=window)
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return different.float() * -100.0


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block over a single class's cost map, guided by CLIP features."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, resolution: int, window: int, shift: int):
        super().__init__()
        if resolution <= window:  # one window covers the map: nothing to shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, dim * 4)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(dim * 4, dim)
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:  # N x H x W x D -> N x nW x L x D
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        return rearrange(x, "n (nh a) (nw b) d -> n (nh nw) (a b) d", a=self.window, b=self.window)

    def _from_windows(self, x: torch.Tensor) -> torch.Tensor:  # N x nW x L x D -> N x H x W x D
        side = self.resolution // self.window
        x = rearrange(x, "n (nh nw) (a b) d -> n (nh a) (nw b) d", nh=side, nw=side, a=self.window)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x

    def guidance_terms(self, guidance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Guidance B x H x W x G (normalized) -> its share of q and k per window, B x 1 x nW x L x D each."""
        if guidance is None:
            return None
        return self.attn.guidance_terms(self._to_windows(guidance).unsqueeze(1))

    def forward(self, x: torch.Tensor, guidance_terms: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: N x H x W x D (N = B*T class maps); guidance_terms: :meth:`guidance_terms` of the B images."""
        windows = self._to_windows(self.norm1(x))
        if guidance_terms is not None:
            # class maps are ordered image-major (b t): view them as B x T to broadcast each image's guidance
            windows = windows.view(guidance_terms[0].shape[0], -1, *windows.shape[1:])
            out = self.attn(windows, guidance_terms, self.attn_mask).flatten(0, 1)
        else:
            out = self.attn(windows, None, self.attn_mask)
        x = x + self._from_windows(out)
        return residual_mlp(x, self.norm2, self.mlp)


class SpatialAggregation(nn.Module):
    """Two Swin blocks (plain, then shifted) applied to each class's cost map independently."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, resolution: int, window: int) -> None:
        super().__init__()
        self.block_1 = SwinBlock(dim, guidance_dim, num_heads, resolution, window, shift=0)
        self.block_2 = SwinBlock(dim, guidance_dim, num_heads, resolution, window, shift=window // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x: B x D x T x h x w; guidance: B x G x h x w -> B x D x T x h x w."""
        batch, _, classes, height, width = x.shape
        g = self.guidance_norm(rearrange(guidance, "b g h w -> b h w g"))
        g1, g2 = self.block_1.guidance_terms(g), self.block_2.guidance_terms(g)  # once, for every class map
        step = cache_block(x, classes, batch * height * width)
        if step >= classes:
            y = rearrange(x, "b d t h w -> (b t) h w d")
            y = self.block_2(self.block_1(y, g1), g2)
            return rearrange(y, "(b t) h w d -> b d t h w", b=batch, t=classes)
        # every class map is independent: a few at a time keep the blocks' activations in the CPU's cache
        out = x.new_empty(batch, classes, height, width, x.shape[1])
        for start in range(0, classes, step):
            y = rearrange(x[:, :, start : start + step], "b d t h w -> (b t) h w d")
            y = self.block_2(self.block_1(y, g1), g2)
            out[:, start : start + step] = y.view(batch, -1, height, width, y.shape[-1])
        return rearrange(out, "b t h w d -> b d t h w")


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """Linear attention's feature map ``F.elu(x) + 1``, computed as ``max(x, 0) + exp(min(x, 0))``: equal to it up
    to float rounding (exp(x) for x <= 0 instead of expm1(x) + 1), and about 5x faster on CPU, where ATen's elu
    kernel is not vectorized (it took 5% of a vit_b16 forward)."""
    return x.clamp(min=0).add_(torch.exp(x.clamp(max=0)))


def linear_attention_state(
    k: torch.Tensor, v: torch.Tensor, length: int, key_counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value summaries of linear attention for one block of keys: (sum_s phi(k_s) v_s^T / length,
    sum_s phi(k_s)). Summaries of disjoint key blocks add up, so a long class list can be processed in chunks.

    k, v: N x S x heads x d; ``key_counts`` (S) says how many identical copies each key stands for.
    """
    k = elu_plus_one(k)
    if key_counts is not None:
        k = k * key_counts.view(1, -1, 1, 1)
    # values are divided by the sequence length and the result multiplied back (the reference does this to
    # avoid fp16 overflow); kept so half-precision runs match
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)  # N x heads x d x d
    return kv, k.sum(dim=1)


def linear_attention_query(
    q: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, length: int, eps: float = 1e-6
) -> torch.Tensor:
    """Queries N x L x heads x d against the summaries of all keys -> N x L x heads x d."""
    q = elu_plus_one(q)
    normalizer = 1 / (torch.einsum("nlhd,nhd->nlh", q, k_sum) + eps)  # N x L x heads
    return (torch.einsum("nlhd,nhdv->nlhv", q, kv) * normalizer.unsqueeze(-1)).mul_(length)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Linear attention ("Transformers are RNNs", feature map elu + 1). q: N x L x heads x d; k, v: N x S x heads
    x d; ``key_counts`` (S): how many identical copies each key/value stands for (default one each)."""
    length = v.shape[1] if key_counts is None else int(key_counts.sum().item())
    kv, k_sum = linear_attention_state(k, v, length, key_counts)
    return linear_attention_query(q, kv, k_sum, length)


@dataclasses.dataclass(frozen=True)
class ClassSummary:
    """What class attention needs of every class to answer any of them: linear attention's key/value summaries."""

    kv: torch.Tensor  # (B pixels) x heads x d x d
    k_sum: torch.Tensor  # (B pixels) x heads x d
    classes: int  # classes summed so far
    length: int  # the padded sequence length the summaries are divided by
    batch: int
    pixels: int


class ClassAggregation(nn.Module):
    """Attention across classes at each pixel: no positional encoding, so permuting classes permutes outputs.

    The class sequence is padded to ``pad_len`` with one learned token: linear attention sums over all keys,
    so the padding changes the result and is reproduced exactly. All padding positions hold the same token
    and guidance, so they enter as one key counted ``pad_len - T`` times; their outputs are discarded, as in
    the reference. Cost grows with T, not with ``pad_len``.

    Classes may arrive in chunks: key/value summaries are accumulated over all chunks first, then each chunk's
    queries are answered, which is exactly attention over the whole class list.
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, train_pooling: int, pad_len: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.train_pooling = train_pooling
        self.pad_len = pad_len
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        if pad_len > 0:
            self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
            self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))

    def _pooling(self) -> int:
        return self.train_pooling if self.training else 1

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x t x h x w -> B x pixels x t x D, average-pooled in training."""
        pooling = self._pooling()
        if pooling > 1:
            batch = x.shape[0]
            x = rearrange(
                F.avg_pool2d(rearrange(x, "b d t h w -> (b t) d h w"), pooling), "(b t) d h w -> b d t h w", b=batch
            )
        return rearrange(x, "b d t h w -> b (h w) t d")

    def _heads(self, t: torch.Tensor, pixels: int) -> torch.Tensor:
        """B x pixels x t x D (pixels may be broadcast) -> (B pixels) x t x heads x D/heads."""
        t = t.expand(-1, pixels, -1, -1)
        return rearrange(t, "b p t (h d) -> (b p) t h d", h=self.num_heads)

    def forward_chunks(self, chunks: list[torch.Tensor], guidances: list[torch.Tensor]) -> list[torch.Tensor]:
        """The class list split in chunks (B x D x t_i x h x w, with guidance B x t_i x G) -> the same chunks.

        The list is updated in place and returned."""
        length = self.sequence_length(sum(chunk.shape[2] for chunk in chunks))
        summary = None
        for chunk, guidance in zip(chunks, guidances, strict=True):
            summary = self.add_summary(summary, chunk, guidance, length)
        summary = self.add_padding(summary, length)
        # replace chunks in place: at inference each input chunk is freed as soon as its output exists
        for i, guidance in enumerate(guidances):
            chunks[i] = self.answer(chunks[i], guidance, summary)
        return chunks

    def sequence_length(self, classes: int) -> int:
        """Keys the attention averages over: the classes, padded to ``pad_len``."""
        return max(classes, self.pad_len) if self.pad_len > 0 else classes

    def add_summary(
        self, summary: ClassSummary | None, x: torch.Tensor, guidance: torch.Tensor, length: int
    ) -> ClassSummary:
        """``summary`` plus the key/value summaries of one chunk's classes (B x D x t x h x w, guidance B x t x G);
        ``length``: :meth:`sequence_length` of the whole class list."""
        normed = self.norm1(self._tokens(x))
        pixels = normed.shape[1]
        k = self._heads(guided_linear(self.k, normed, guidance.unsqueeze(1)), pixels)
        v = self._heads(self.v(normed), pixels)
        kv, k_sum = linear_attention_state(k, v, length)
        if summary is None:
            return ClassSummary(kv, k_sum, x.shape[2], length, x.shape[0], pixels)
        return dataclasses.replace(summary, kv=summary.kv + kv, k_sum=summary.k_sum + k_sum,
                                   classes=summary.classes + x.shape[2])  # fmt: skip

    def add_padding(self, summary: ClassSummary, length: int) -> ClassSummary:
        """The summary of every class plus that of the padding (one key counted ``length - classes`` times)."""
        padding = length - summary.classes
        if padding <= 0:
            return summary
        pad = self.norm1(self.padding_tokens).unsqueeze(0)  # 1 x 1 x 1 x D, the same at every pixel
        k = guided_linear(self.k, pad, self.padding_guidance.unsqueeze(0)).expand(summary.batch, -1, -1, -1)
        v = self.v(pad).expand(summary.batch, -1, -1, -1)
        counts = torch.full((1,), float(padding), device=k.device, dtype=k.dtype)
        pixels = summary.pixels
        kv_pad, k_sum_pad = linear_attention_state(self._heads(k, pixels), self._heads(v, pixels), length, counts)
        return dataclasses.replace(summary, kv=summary.kv + kv_pad, k_sum=summary.k_sum + k_sum_pad)

    def answer(self, x: torch.Tensor, guidance: torch.Tensor, summary: ClassSummary) -> torch.Tensor:
        """One chunk's classes attend to every class through the summary of all of them (padding included)."""
        return self._answer(x, guidance, summary.kv, summary.k_sum, summary.length)

    def _answer(
        self, x: torch.Tensor, guidance: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, length: int
    ) -> torch.Tensor:
        batch, _, _, height, width = x.shape
        tokens = self._tokens(x)
        normed = self.norm1(tokens)
        q = self._heads(guided_linear(self.q, normed, guidance.unsqueeze(1)), tokens.shape[1])
        attended = rearrange(linear_attention_query(q, kv, k_sum, length), "(b p) t h d -> b p t (h d)", b=batch)
        tokens = add_residual(attended, tokens)  # no output projection, as in the reference
        tokens = residual_mlp(tokens, self.norm2, self.mlp)

        ph = height // self._pooling()
        out = rearrange(tokens, "b (h w) t d -> b d t h w", h=ph)
        if self._pooling() > 1:
            out = F.interpolate(
                rearrange(out, "b d t h w -> (b t) d h w"), size=(height, width), mode="bilinear", align_corners=True
            )
            out = rearrange(out, "(b t) d h w -> b d t h w", b=batch)
        return x + out  # ``out`` already holds its own residual: the result is about 2x + delta


class AggregatorLayer(nn.Module):
    """One spatial + one class aggregation block; CostAggregator runs their halves chunk by chunk."""

    def __init__(self, config_dims: dict[str, int]) -> None:
        super().__init__()
        d = config_dims
        self.spatial = SpatialAggregation(d["dim"], d["guidance"], d["heads"], d["resolution"], d["window"])
        self.class_attention = ClassAggregation(d["dim"], d["guidance"], d["heads"], d["pooling"], d["pad_len"])


class CostAggregator(nn.Module):
    """Cost embedding, guidance projections and the stack of spatial + class aggregation layers."""

    def __init__(
        self,
        *,
        clip_dim: int,
        prompts: int,
        hidden_dim: int,
        guidance_dim: int,
        num_heads: int,
        num_layers: int,
        resolution: int,
        window: int,
        kernel: int,
        train_pooling: int,
        pad_len: int,
    ) -> None:
        super().__init__()
        self.cost_embed = nn.Conv2d(prompts, hidden_dim, kernel_size=kernel, padding=kernel // 2)
        self.appearance_guidance_proj = nn.Sequential(
            nn.Conv2d(clip_dim, guidance_dim, kernel_size=3, padding=1), nn.ReLU()
        )
        self.text_guidance_proj = nn.Sequential(nn.Linear(clip_dim, guidance_dim), nn.ReLU())
        dims = {
            "dim": hidden_dim,
            "guidance": guidance_dim,
            "heads": num_heads,
            "resolution": resolution,
            "window": window,
            "pooling": train_pooling,
            "pad_len": pad_len,
        }
        self.layers = nn.ModuleList(AggregatorLayer(dims) for _ in range(num_layers))

    def embed(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cost volume of some classes, embedded: (B,C,h,w), (B,t,P,C) -> B x D x t x h x w."""
        cost = cost_volume(image_features, text_features)
        batch = cost.shape[0]
        x = self.cost_embed(rearrange(cost, "b p t h w -> (b t) p h w"))  # no activation, as in the reference
        return rearrange(x, "(b t) d h w -> b d t h w", b=batch)

    def _guidance(
        self, image_features: torch.Tensor, text_features: torch.Tensor, class_chunk: int | None
    ) -> tuple[list[slice], torch.Tensor, torch.Tensor]:
        """The class chunks, the appearance guidance and the text guidance B x T x G (prompts averaged)."""
        classes = text_features.shape[1]
        step = class_chunk or classes
        slices = [slice(start, start + step) for start in range(0, classes, step)]
        appearance = self.appearance_guidance_proj(image_features)
        text = F.normalize(text_features.mean(dim=-2), dim=-1)  # average over prompt templates
        return slices, appearance, self.text_guidance_proj(text)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, class_chunk: int | None = None
    ) -> list[torch.Tensor]:
        """image_features: B x C x h x w; text_features: B x T x P x C -> aggregated cost volume, as a list of
        class chunks B x D x t_i x h x w (one chunk unless ``class_chunk`` is set).

        Everything but the class attention is independent per class; chunking bounds the memory of those parts
        (and of the decoder after them) while the class attention still sees every class.
        """
        slices, appearance, text = self._guidance(image_features, text_features, class_chunk)
        texts = [text[:, part] for part in slices]
        chunks = [self.embed(image_features, text_features[:, part]) for part in slices]
        for layer in self.layers:
            for i, chunk in enumerate(chunks):  # in place: one chunk's input and output alive at a time
                chunks[i] = layer.spatial(chunk, appearance)
            chunks = layer.class_attention.forward_chunks(chunks, texts)
        return chunks

    def stream(
        self, image_features: torch.Tensor, text_features: torch.Tensor, class_chunk: int
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """:meth:`forward` one aggregated chunk at a time, holding nothing per class across chunks.

        A layer's class attention needs a summary of every class's input to that layer. Each layer's summary is
        gathered in one pass over the chunks, recomputing each chunk's earlier layers from its cost volume (their
        summaries are known by then); a last pass yields the chunks. The operations on each chunk are those of
        :meth:`forward` with the same ``class_chunk``, so the outputs are the same; the price is recomputation
        (with 2 layers: the first spatial block 3 times, the second twice).
        """
        classes = text_features.shape[1]
        slices, appearance, text = self._guidance(image_features, text_features, class_chunk)
        summaries: list[ClassSummary] = []

        def through(part: slice, layers: int) -> torch.Tensor:
            """A chunk's cost embedding through ``layers`` whole layers and the spatial half of the next one."""
            x = self.embed(image_features, text_features[:, part])
            for index, layer in enumerate(self.layers[: layers + 1]):
                x = layer.spatial(x, appearance)
                if index < layers:
                    x = layer.class_attention.answer(x, text[:, part], summaries[index])
            return x

        for index, layer in enumerate(self.layers):
            attention = layer.class_attention
            length = attention.sequence_length(classes)
            summary = None
            for part in slices:
                summary = attention.add_summary(summary, through(part, index), text[:, part], length)
            summaries.append(attention.add_padding(summary, length))
        last = len(self.layers) - 1
        for part in slices:
            yield part, self.layers[last].class_attention.answer(through(part, last), text[:, part], summaries[last])
