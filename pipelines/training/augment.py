"""Training augmentation (DESIGN.md section 2): short side -> crop size, random crop, SSD colour jitter, horizontal
flip. The order (resize, crop, colour, flip) and jitter ranges follow the reference's detectron2 mapper
(ResizeShortestEdge, RandomCrop "absolute", ColorAugSSDTransform, RandomFlip). Also the validation resize.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 * 256 / 180  # OpenCV hue units (0..180) -> PIL's 0..255


def resize_short_side(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear image, nearest-neighbour label; the short side becomes ``size``."""
    height, width = label.shape
    if image.shape[:2] != label.shape:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but its label is {width}x{height}")
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_h, new_w) == (height, width):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.Resampling.NEAREST))
    return image, label


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD photometric distortion: brightness, then contrast before or after saturation and hue, each p = 0.5."""
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        out *= rng.uniform(*CONTRAST_RANGE)
    saturation = rng.uniform(*SATURATION_RANGE) if rng.random() < 0.5 else None
    hue = rng.uniform(-HUE_DELTA, HUE_DELTA) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(out.clip(0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = (hsv[..., 1] * saturation).clip(0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue) % 256
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        out *= rng.uniform(*CONTRAST_RANGE)
    return out.clip(0, 255).astype(np.uint8)


def augment(
    image: np.ndarray, label: np.ndarray, crop_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One training example: crop_size x crop_size x 3 uint8 image and crop_size x crop_size uint8 label."""
    image, label = resize_short_side(image, label, crop_size)
    height, width = label.shape
    top = int(rng.integers(0, height - crop_size + 1))
    left = int(rng.integers(0, width - crop_size + 1))
    image = image[top : top + crop_size, left : left + crop_size]
    label = label[top : top + crop_size, left : left + crop_size]
    image = color_jitter(image, rng)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def resize_for_eval(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole image squashed to size x size (aspect ignored, as in the inference protocol's first resize)."""
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST))
    return image, label
