"""Single-image and batched inference with the paper's sliding-window protocol.

Protocol (as the reference evaluates): resize the image to 640 x 640 (aspect ignored); cut 4 crops of 384 with
stride 256 plus one global view of the whole image at 384; sigmoid each view's logits (upsampled to 384);
stitch the crops averaging overlaps; final = (stitched + global) / 2; resize to the original size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import PRECISIONS
from .model import CATSeg, ClassesLike
from .vocabulary import validate_vocabulary

ImageLike = np.ndarray | torch.Tensor

# Opt-in reduced precision for the model forward (autocast); the stitching and sigmoid stay in float32.
AUTOCAST_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))


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
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an RGB array H x W x 3, got shape {image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"image array must be uint8 (0..255) or float (0..255), got {image.dtype}")
        if not image.flags.writeable:  # torch wants writable memory (e.g. arrays viewing PIL buffers)
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3 x H x W (RGB), got shape {tuple(image.shape)}")
        return image.float()
    if hasattr(image, "convert"):  # PIL image
        return image_to_tensor(np.asarray(image.convert("RGB")))
    raise TypeError(f"image must be a numpy array, torch tensor or PIL image, got {type(image).__name__}")


class Predictor:
    """Runs a :class:`CATSeg` model on images of any size; caches vocabulary embeddings.

    ``device`` defaults to CUDA when available, else CPU. Memory is bounded by ``views_per_forward`` (384 x 384
    views through the model at once; 5 per image) and ``class_chunk`` (classes through the per-class parts of
    the model and the stitching at once); neither changes the outputs. ``truncate=False`` keeps every class of
    a vocabulary larger than 256 instead of the reference's per-image top-256 (which gives the rest logit -100).
    ``precision`` "bfloat16" or "float16" runs the model under autocast (faster on GPUs with tensor cores;
    outputs differ slightly from float32, see the README for the measured effect).
    """

    DEFAULT_CLASS_CHUNK = 32  # bounds memory at no cost in outputs; jobs record it with their results

    def __init__(
        self,
        model: CATSeg,
        device: str | torch.device | None = None,
        *,
        resize: int = 640,
        crop: int = 384,
        stride: int = 256,
        views_per_forward: int = 5,
        class_chunk: int = DEFAULT_CLASS_CHUNK,
        truncate: bool = True,
        precision: str = "float32",
        cache_size: int = 4,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.resize, self.crop, self.stride = resize, crop, stride
        self.offsets = [(y, x) for y in crop_offsets(resize, crop, stride) for x in crop_offsets(resize, crop, stride)]
        self.views_per_forward = max(1, views_per_forward)
        if class_chunk < 1:
            raise ValueError(f"class_chunk must be at least 1, got {class_chunk}")
        self.class_chunk = class_chunk
        self.truncate = truncate
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.cache_size = cache_size
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
        resized = F.interpolate(image[None], size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        crops = [resized[0, :, y : y + self.crop, x : x + self.crop] for y, x in self.offsets]
        whole = F.interpolate(image[None], size=(self.crop, self.crop), mode="bilinear", align_corners=False)[0]
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
        dtype = AUTOCAST_DTYPES[self.precision]
        logits = []
        for chunk in views.split(self.views_per_forward):
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.model(chunk, text, class_chunk=self.class_chunk, truncate=self.truncate)
            logits.append(out.float())
        return list(torch.cat(logits).split(len(self.offsets) + 1))

    def _class_chunks(self, classes: int) -> list[slice]:
        return [slice(start, start + self.class_chunk) for start in range(0, classes, self.class_chunk)]

    def predict(self, image: ImageLike, classes: ClassesLike) -> np.ndarray:
        """Per-class probabilities T x H x W (float32) at the image's original size."""
        return self.predict_batch([image], classes)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[ImageLike], classes: ClassesLike) -> list[np.ndarray]:
        tensors = [image_to_tensor(img) for img in images]
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
        """(label map H x W int64, its probability H x W float32): the argmax of :meth:`predict`, computed per
        class chunk so that neither T x 640 x 640 nor T x H x W floats are ever held."""
        return self.predict_labels_batch([image], classes)[0]

    @torch.inference_mode()
    def predict_labels_batch(
        self, images: Sequence[ImageLike], classes: ClassesLike
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        tensors = [image_to_tensor(img) for img in images]
        text = self.embed_classes(classes)
        out = []
        for tensor, logits in zip(tensors, self._view_logits(tensors, text), strict=True):
            size = tuple(tensor.shape[-2:])
            best = labels = None
            for part in self._class_chunks(logits.shape[1]):
                chunk = F.interpolate(
                    self._stitch(logits[:, part])[None], size=size, mode="bilinear", align_corners=False
                )
                value, index = chunk[0].max(dim=0)
                index = index + part.start
                if best is None:
                    best, labels = value, index
                else:
                    better = value > best  # strict: ties keep the lower class id, as argmax does
                    best = torch.where(better, value, best)
                    labels = torch.where(better, index, labels)
            out.append((labels.cpu().numpy(), best.float().cpu().numpy()))
        return out
