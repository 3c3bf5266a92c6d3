"""Image bytes -> RGB uint8 arrays, the way every image in a collection should look to the model; label files ->
class ids (one decoder and one set of label encodings for training, evaluation and preview).

EXIF orientation is applied (so width/height and masks match what a viewer shows); palette, alpha, CMYK and
grayscale images become RGB; 16/32-bit grayscale is scaled to 8 bits over the full 16-bit range; the first frame
of animated/multi-page files is used. Errors are raised as ``ImageDecodeError`` with a readable reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

register_heif_opener()  # HEIC/HEIF, the format of most phone photos, through Pillow's own Image.open


class ImageDecodeError(ValueError):
    """The bytes are not a usable image."""


def _high_bit_depth_to_rgb(image: Image.Image) -> np.ndarray:
    values = np.asarray(image)
    if image.mode == "F":
        # float images: 0..1 is the usual convention, anything larger is taken as 0..255
        scale = 255.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 1.0
        gray = np.nan_to_num(values.astype(np.float64) * scale)
    else:
        # I;16* and I (Pillow's mode for 16-bit PNG/TIFF): values span 0..65535
        gray = values.astype(np.float64) / 257.0
    gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray8[:, :, None], 3, axis=2)


DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: drone tiles and 48 MP phone photos pass, decompression bombs do not


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the caller allows, found from the header before anything is decoded."""


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB (EXIF-oriented).

    ``max_pixels`` refuses larger images from their header, before they are decoded (Pillow's own
    decompression-bomb limit applies as well)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
                    f"{max_pixels / 1e6:g} MP; raise --max-pixels to label it"
                )
            opened.seek(0)
            opened.load()  # decode now: truncated files fail here, not later
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return _high_bit_depth_to_rgb(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8).copy()
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not a recognized image format") from err
    except Image.DecompressionBombError as err:  # over Pillow's pixel limit: refuse rather than exhaust memory
        raise ImageDecodeError(f"image too large: {err}") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err


# -- labels -------------------------------------------------------------------------------------------------------
IGNORE_ID = 65535  # decoded labels are uint16 class ids; this value marks ignored pixels


class LabelIdError(ValueError):
    """A label holds class ids the class list does not cover: the dataset, benchmark or class file is wrong."""


@dataclass(frozen=True)
class LabelEncoding:
    """How a label file stores class ids: ``class id = lookup[stored]`` when a lookup table is given (IGNORE_ID in
    it: ignored), else ``stored + offset``; stored values in ``ignore_values`` are ignored either way."""

    offset: int = 0
    ignore_values: tuple[int, ...] = (255,)
    lookup: tuple[int, ...] = ()


# COCO category ids that the COCO-Stuff stuffthingmaps never use (retired thing ids, and 90 between things and stuff)
_COCO_UNUSED_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
_COCO_USED_IDS = [i for i in range(182) if i not in _COCO_UNUSED_IDS]

# Every label encoding the datasets and benchmarks use, by the name their configs carry.
LABEL_ENCODINGS: dict[str, LabelEncoding] = {
    "class_ids": LabelEncoding(0, (255,)),  # what CAT-Seg's prepare scripts write; 255 = ignore
    "ade20k_raw": LabelEncoding(-1, (0,)),  # ADE20K annotations: class k stored as k + 1, 0 = unlabelled
    "ade20k_full": LabelEncoding(0, (65535,)),  # ADE20K-847 TIFFs
    "pascal_context_459": LabelEncoding(0, (459,)),
    # COCO-Stuff stuffthingmaps: COCO category ids 0..181 with gaps -> the 171 contiguous train ids
    "coco_stuff_raw": LabelEncoding(
        ignore_values=(255,),
        lookup=tuple(_COCO_USED_IDS.index(v) if v in _COCO_USED_IDS else IGNORE_ID for v in range(256)),
    ),
}


def label_encoding(encoding: str | LabelEncoding) -> LabelEncoding:
    if isinstance(encoding, LabelEncoding):
        return encoding
    if encoding not in LABEL_ENCODINGS:
        raise ValueError(f"unknown label encoding {encoding!r}; choose one of {', '.join(LABEL_ENCODINGS)}")
    return LABEL_ENCODINGS[encoding]


def decode_label(data: bytes, encoding: str | LabelEncoding = "class_ids") -> np.ndarray:
    """Label file bytes (8/16/32-bit single-channel PNG or TIFF) -> H x W uint16 class ids, IGNORE_ID = ignored.

    A stored value that is not ignored but gives no valid id (negative after the offset, beyond the lookup table,
    too large for uint16) becomes ``IGNORE_ID - 1``, an id no class list has, so that :func:`check_label_ids`
    refuses it.
    """
    encoding = label_encoding(encoding)
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
            raise ValueError(f"labels must be single-channel class ids, got a {image.mode} image")
        stored = np.asarray(image).astype(np.int64)
    if stored.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {stored.shape}")
    ignored = np.isin(stored, encoding.ignore_values)
    if encoding.lookup:
        table = np.asarray(encoding.lookup, dtype=np.int64)
        ids = np.where((stored >= 0) & (stored < len(table)), table[np.clip(stored, 0, len(table) - 1)], -1)
        ignored |= ids == IGNORE_ID  # values the table marks as unused
    else:
        ids = stored + encoding.offset
    ids = np.where((ids < 0) | (ids >= IGNORE_ID), IGNORE_ID - 1, ids)
    return np.where(ignored, IGNORE_ID, ids).astype(np.uint16)


def check_label_ids(
    label: np.ndarray, num_classes: int, uri: str, *, limit: str = "the class list has {n} names", fix: str = ""
) -> None:
    """Raise :class:`LabelIdError` if ``label`` (decoded) holds ids outside 0..num_classes-1 other than IGNORE_ID.

    ``limit`` and ``fix`` word the error for the caller (the class list of a dataset, the classes of a benchmark).
    """
    ids = np.unique(label)
    bad = ids[(ids >= num_classes) & (ids != IGNORE_ID)]
    if bad.size:
        raise LabelIdError(
            f"label {uri} holds class id(s) {bad.tolist()[:5]} but {limit.format(n=num_classes)} "
            f"(ids 0..{num_classes - 1})" + (f": {fix}" if fix else "")
        )
