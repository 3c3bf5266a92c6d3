"""Image bytes -> RGB uint8 arrays, the way every image in a collection should look to the model.

EXIF orientation is applied (so width/height and masks match what a viewer shows); palette, alpha, CMYK and
grayscale images become RGB; 16/32-bit grayscale is scaled to 8 bits over the full 16-bit range; the first frame
of animated/multi-page files is used. Errors are raised as ``ImageDecodeError`` with a readable reason.
"""

from __future__ import annotations

import io

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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB (EXIF-oriented)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
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
