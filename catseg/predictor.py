"""Single-image and batched inference with the paper's sliding-window protocol.

Protocol (as the reference evaluates): resize the image to 640 x 640 (aspect ignored); cut 4 crops of 384 with
stride 256 plus one global view of the whole image at 384; sigmoid each view's logits (upsampled to 384);
stitch the crops averaging overlaps; final = (stitched + global) / 2; resize to the original size.

Large images cost memory in proportion to their pixels only: above :data:`BANDED_ABOVE_PIXELS` the image is turned
into floats a band of rows at a time while it is resized to the working resolution, and the final upsampling and
argmax run a band at a time (:func:`resize_bilinear`, :meth:`Predictor.predict_labels_batch`). Bilinear
interpolation is separable and PyTorch's kernel interpolates along the width first, so a first call that only
changes the width (rows independent) followed by one on the transposed result that only changes the height gives
the same floats as one call; the tests check it bit for bit.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import allocator
from .config import PRECISIONS
from .model import CATSeg, ClassesLike
from .vocabulary import validate_vocabulary

ImageLike = np.ndarray | torch.Tensor

# Opt-in reduced precision for the model forward (autocast); the stitching and sigmoid stay in float32.
AUTOCAST_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))


# Above this many pixels (original image), the resize to the working resolution and the final upsampling run in
# bands. Below it one call each, as the reference does (the per-class-chunk upsampling then holds at most
# class_chunk x 1 MP floats).
BANDED_ABOVE_PIXELS = 1 << 20
BAND_FLOATS = 1 << 22  # floats per band (16 MB): the memory of a band is the same whatever the image size
# Vocabularies above this stream through the model by default when nothing truncates them (memory flat in T)
STREAM_ABOVE_CLASSES = 256


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned type that holds every class id of a vocabulary (uint8 up to 256 classes)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{num_classes} classes do not fit a 32-bit label map")


def _torch_label_dtype(num_classes: int) -> torch.dtype:
    # torch's uint16/uint32 lack the ops used here (where); int32 holds every id and is narrowed on the way out
    return torch.uint8 if label_dtype(num_classes) == np.uint8 else torch.int32


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x H x W -> C x h x w, the interpolation the protocol uses everywhere."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_bilinear(image: torch.Tensor, size: tuple[int, int], band_floats: int = BAND_FLOATS) -> torch.Tensor:
    """C x H x W (uint8 or float) -> float32 C x h x w, equal to ``F.interpolate(image.float(), size, "bilinear")``
    without ever holding the whole image as floats: a band of input rows is converted and resized along the width
    at a time, then the narrow result is resized along the height (transposed, so the call changes the width)."""
    channels, height, width = image.shape
    if height * width <= BANDED_ABOVE_PIXELS:
        return _bilinear(image.float(), size)
    out_height, out_width = size
    rows = max(1, band_floats // (channels * width))
    narrow = image.new_empty((channels, height, out_width), dtype=torch.float32)
    for start in range(0, height, rows):
        band = image[:, start : start + rows].float()
        narrow[:, start : start + rows] = _bilinear(band, (band.shape[1], out_width))
    tall = _bilinear(narrow.transpose(1, 2).contiguous(), (out_width, out_height))
    return tall.transpose(1, 2).contiguous()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def crop_offsets(size: int, crop: int, stride: int) -> list[int]:
    """Top-left offsets of sliding windows along one side (the last window ends at the border)."""
    if crop >= size:
        return [0]
    offsets = list(range(0, size - crop + 1, stride))
    if offsets[-1] != size - crop:
        offsets.append(size - crop)
    return offsets


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """H x W x 3 uint8/float array (or 3 x H x W float tensor) -> float 3 x H x W in 0..255."""
    return _image_chw(image).float()


def _image_chw(image: ImageLike) -> torch.Tensor:
    """:func:`image_to_tensor` without the float conversion: a uint8 array stays uint8 (a view, no copy)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an RGB array H x W x 3, got shape {image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"image array must be uint8 (0..255) or float (0..255), got {image.dtype}")
        if not image.flags.writeable:  # torch wants writable memory (e.g. arrays viewing PIL buffers)
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3 x H x W (RGB), got shape {tuple(image.shape)}")
        return image
    if hasattr(image, "convert"):  # PIL image
        return _image_chw(np.asarray(image.convert("RGB")))
    raise TypeError(f"image must be a numpy array, torch tensor or PIL image, got {type(image).__name__}")


class Predictor:
    """Runs a :class:`CATSeg` model on images of any size; caches vocabulary embeddings.

    ``device`` defaults to CUDA when available, else CPU. Memory is bounded by ``views_per_forward`` (384 x 384
    views through the model at once; 5 per image) and ``class_chunk`` (classes through the per-class parts of
    the model and the stitching at once; by default 32 on CUDA, 8 on CPU); neither changes the outputs beyond
    float rounding (about 2e-6 in the logits). ``truncate=False`` keeps every class of
    a vocabulary larger than 256 instead of the reference's per-image top-256 (which gives the rest logit -100).
    ``precision`` "bfloat16" or "float16" runs the model under autocast (faster on GPUs with tensor cores;
    outputs differ slightly from float32, see the README for the measured effect).
    ``stream_classes`` makes :meth:`predict_labels_batch` hold nothing per class across class chunks (memory flat
    in the vocabulary, at the cost of recomputing the aggregator's earlier layers; same labels). The default
    (None) streams when every class goes through class attention untruncated and there are more than
    :data:`STREAM_ABOVE_CLASSES`.
    ``retain_freed_memory`` (on a CPU device) keeps the model's activations in glibc's heap from one forward to
    the next instead of unmapping and page-faulting them in again (:func:`catseg.allocator.retaining_freed_memory`,
    around each model call): 1.1-1.3x faster CPU forwards; ``MALLOC_MMAP_MAX_`` in the environment turns it off.
    """

    DEFAULT_CLASS_CHUNK = 32  # on CUDA; bounds memory at no cost in outputs; jobs record it with their results
    # On CPU the model's activations stay in glibc's heap between forwards (retain_freed_memory), where freed
    # blocks are reused only when they fit: how much of the heap the holes waste depends on the address layout,
    # so the peak varied from run to run (743-1,004 MiB above the model for the tiny model's first forward at
    # T = 150, 1,018 every time with ASLR off and one thread). The largest blocks grow with the class chunk:
    # 8 classes at a time make them 4x smaller (that forward's peak 309-343 MiB), at the same speed.
    CPU_CLASS_CHUNK = 8

    def __init__(
        self,
        model: CATSeg,
        device: str | torch.device | None = None,
        *,
        resize: int = 640,
        crop: int = 384,
        stride: int = 256,
        views_per_forward: int = 5,
        class_chunk: int | None = None,
        truncate: bool = True,
        precision: str = "float32",
        cache_size: int = 4,
        stream_classes: bool | None = None,
        retain_freed_memory: bool = True,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.retain_freed_memory = retain_freed_memory and self.device.type == "cpu"
        self.model = model.to(self.device).eval()
        self.resize, self.crop, self.stride = resize, crop, stride
        self.offsets = [(y, x) for y in crop_offsets(resize, crop, stride) for x in crop_offsets(resize, crop, stride)]
        self.views_per_forward = max(1, views_per_forward)
        if class_chunk is None:
            class_chunk = self.CPU_CLASS_CHUNK if self.device.type == "cpu" else self.DEFAULT_CLASS_CHUNK
        if class_chunk < 1:
            raise ValueError(f"class_chunk must be at least 1, got {class_chunk}")
        self.class_chunk = class_chunk
        self.truncate = truncate
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.cache_size = cache_size
        self.stream_classes = stream_classes
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # -- vocabulary -------------------------------------------------------------------------------------------
    def _text_weights_version(self) -> tuple[int, ...]:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter: a changed text
        # encoder invalidates cached embeddings without hashing weights.
        clip = self.model.backbone.clip
        versions = [p._version for p in clip.transformer.parameters()]
        return (*versions, clip.token_embedding.weight._version, clip.text_projection._version)

    def embed_classes(self, classes: ClassesLike) -> torch.Tensor:
        """Text embeddings T x P x C for a vocabulary, cached by (model, vocabulary, text weights)."""
        if isinstance(classes, torch.Tensor):
            return self.model.text_embeddings(classes)
        names = tuple(validate_vocabulary(classes))
        key = (id(self.model), names, self._text_weights_version())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.inference_mode():
            embeddings = self.model.embed_classes(list(names))
        self._cache[key] = embeddings
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- inference --------------------------------------------------------------------------------------------
    def _views(self, image: torch.Tensor) -> torch.Tensor:
        """3 x H x W -> V x 3 x crop x crop: the sliding-window crops of the resized image, then the global view."""
        resized = resize_bilinear(image, (self.resize, self.resize))
        crops = [resized[:, y : y + self.crop, x : x + self.crop] for y, x in self.offsets]
        whole = resize_bilinear(image, (self.crop, self.crop))
        return torch.stack([*crops, whole])

    def _stitch(self, logits: torch.Tensor) -> torch.Tensor:
        """V x t x h x w view logits -> t x resize x resize probabilities (crops averaged, then the global view)."""
        probs = F.interpolate(logits, size=(self.crop, self.crop), mode="bilinear", align_corners=False).sigmoid()
        classes = probs.shape[1]
        total = probs.new_zeros(classes, self.resize, self.resize)
        count = probs.new_zeros(1, self.resize, self.resize)
        for view, (y, x) in zip(probs[:-1], self.offsets, strict=True):
            total[:, y : y + self.crop, x : x + self.crop] += view
            count[:, y : y + self.crop, x : x + self.crop] += 1
        whole = F.interpolate(probs[-1:], size=(self.resize, self.resize), mode="bilinear", align_corners=False)[0]
        return (total / count + whole) / 2

    @torch.inference_mode()
    def _view_logits(self, images: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the logits of its views: V x T x 96 x 96 (small: the stitching runs per class chunk)."""
        views = torch.cat([self._views(img.to(self.device)) for img in images])
        logits = []
        for chunk in views.split(self.views_per_forward):
            with self.forward_context():
                out = self.model(chunk, text, class_chunk=self.class_chunk, truncate=self.truncate)
            logits.append(out.float())
        return list(torch.cat(logits).split(len(self.offsets) + 1))

    def forward_context(self) -> contextlib.ExitStack:
        """The context of every model call the Predictor makes (enter it to call ``self.model`` the same way):
        autocast at ``precision``; on CPU, freed memory kept for the next call (``retain_freed_memory``)."""
        stack = contextlib.ExitStack()
        dtype = AUTOCAST_DTYPES[self.precision]
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None))
        if self.retain_freed_memory:
            stack.enter_context(allocator.retaining_freed_memory())
        return stack

    def streams(self, num_classes: int) -> bool:
        """Whether :meth:`predict_labels_batch` streams a vocabulary of this size (see ``stream_classes``)."""
        pad_len = self.model.config.pad_len
        truncated = self.truncate and 0 < pad_len < num_classes
        if truncated:  # the top-pad_len selection needs every class at once; it bounds memory by itself
            return False
        return self.stream_classes if self.stream_classes is not None else num_classes > STREAM_ABOVE_CLASSES

    @torch.inference_mode()
    def _streamed_view_logits(self, image: torch.Tensor, text: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """One image's view logits V x t x 96 x 96, one class chunk at a time (:meth:`CATSeg.segment_streamed`)."""
        views = self._views(image.to(self.device))
        # the model-call context is entered per step: never left on while this generator is suspended
        with self.forward_context():
            encoded = [self.model.encode_images(group) for group in views.split(self.views_per_forward)]
        dense = torch.cat([d for d, _ in encoded])
        guidance = [torch.cat(parts) for parts in zip(*(g for _, g in encoded), strict=True)]
        del encoded, views
        stream = self.model.segment_streamed(dense, guidance, text, class_chunk=self.class_chunk)
        while True:
            with self.forward_context():
                step = next(stream, None)
            if step is None:
                return
            yield step[0], step[1].float()

    def _class_chunks(self, classes: int) -> list[slice]:
        return [slice(start, start + self.class_chunk) for start in range(0, classes, self.class_chunk)]

    def predict(self, image: ImageLike, classes: ClassesLike) -> np.ndarray:
        """Per-class probabilities T x H x W (float32) at the image's original size."""
        return self.predict_batch([image], classes)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[ImageLike], classes: ClassesLike) -> list[np.ndarray]:
        tensors = [_image_chw(img) for img in images]
        text = self.embed_classes(classes)
        out = []
        for tensor, logits in zip(tensors, self._view_logits(tensors, text), strict=True):
            size = tuple(tensor.shape[-2:])
            probs = np.empty((logits.shape[1], *size), dtype=np.float32)
            for part in self._class_chunks(logits.shape[1]):
                full = F.interpolate(
                    self._stitch(logits[:, part])[None], size=size, mode="bilinear", align_corners=False
                )
                probs[part] = full[0].float().cpu().numpy()
            out.append(probs)
        return out

    def predict_labels(self, image: ImageLike, classes: ClassesLike) -> tuple[np.ndarray, np.ndarray]:
        """(label map H x W, its probability H x W float32): the argmax of :meth:`predict` (ties: the lower class
        id). Labels are uint8 for up to 256 classes, else uint16 (:func:`label_dtype`). Computed per class chunk
        and, for large images, per band, so that neither T x 640 x 640 nor T x H x W floats are ever held."""
        return self.predict_labels_batch([image], classes)[0]

    @torch.inference_mode()
    def predict_labels_batch(
        self, images: Sequence[ImageLike], classes: ClassesLike, *, runner_up: bool = False
    ) -> list[tuple[np.ndarray, ...]]:
        """:meth:`predict_labels` per image; ``runner_up`` adds a third map, the second-highest probability of
        each pixel (the top-1 minus top-2 margin measures how sure the label is), at the same memory bound."""
        tensors = [_image_chw(img) for img in images]
        text = self.embed_classes(classes)
        num_classes = text.shape[0]
        streamed = self.streams(num_classes)
        all_logits = [None] * len(tensors) if streamed else self._view_logits(tensors, text)
        out = []
        for tensor, logits in zip(tensors, all_logits, strict=True):
            height, width = tensor.shape[-2:]
            banded = height * width > BANDED_ABOVE_PIXELS
            size = (width, height) if banded else (height, width)  # see _keep_best
            best = torch.full(size, -1.0, device=self.device)  # below every probability: the first chunk wins
            second = torch.full(size, -1.0, device=self.device) if runner_up else None
            labels = torch.zeros(size, dtype=_torch_label_dtype(num_classes), device=self.device)
            if streamed:
                chunks = self._streamed_view_logits(tensor, text)
            else:
                chunks = ((part, logits[:, part]) for part in self._class_chunks(num_classes))
            for part, chunk in chunks:
                self._keep_best(self._stitch(chunk), part.start, best, labels, second)
            maps = [labels, best] + ([second.clamp_(min=0)] if second is not None else [])  # 1 class: no runner-up
            if banded:
                maps = [m.T for m in maps]
            arrays = [np.ascontiguousarray(m.cpu().numpy()) for m in maps]
            arrays[0] = arrays[0].astype(label_dtype(num_classes), copy=False)
            out.append(tuple(arrays))
        return out

    @staticmethod
    def _keep_best(
        probs: torch.Tensor,
        first_class: int,
        best: torch.Tensor,
        labels: torch.Tensor,
        second: torch.Tensor | None = None,
    ) -> None:
        """Upsample t x h x w probabilities of classes ``first_class``.. to H x W and keep, per pixel, the highest
        so far in ``best`` and its class in ``labels`` (in place; strict: ties keep the lower class id), and the
        second highest in ``second`` when given.

        The maps are H x W, or W x H (transposed) for images above :data:`BANDED_ABOVE_PIXELS`, whose bands of
        output columns are then contiguous rows."""

        def merge(full: torch.Tensor, offset: int, best: torch.Tensor, labels: torch.Tensor, second) -> None:
            value, index = full.max(dim=0)
            if second is not None:  # second of the union of two top-2 lists: max(min(tops), max(seconds))
                runner = full.topk(2, dim=0).values[1] if full.shape[0] > 1 else torch.full_like(value, -1.0)
                torch.maximum(torch.minimum(best, value), torch.maximum(second, runner), out=second)
            better = value > best
            torch.where(better, value, best, out=best)
            torch.where(better, (index + offset).to(labels.dtype), labels, out=labels)

        if best.numel() <= BANDED_ABOVE_PIXELS:
            merge(_bilinear(probs, tuple(best.shape)), first_class, best, labels, second)
            return
        width, height = best.shape
        classes, rows_in, _ = probs.shape
        # Width first on a few classes at a time (k x h x W), then the height on bands of output columns.
        step = max(1, min(classes, 4 * BAND_FLOATS // (rows_in * width)))
        for start in range(0, classes, step):
            narrow = _bilinear(probs[start : start + step], (rows_in, width))
            columns = max(1, BAND_FLOATS // (narrow.shape[0] * height))
            for col in range(0, width, columns):
                band = narrow[:, :, col : col + columns].transpose(1, 2).contiguous()
                tall = _bilinear(band, (band.shape[1], height))  # k x columns x H
                rows = slice(col, col + columns)
                merge(tall, first_class + start, best[rows], labels[rows], None if second is None else second[rows])
