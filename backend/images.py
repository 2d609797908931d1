"""Decoding messy real-world image bytes into RGB PIL images, and hashing them."""
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from backend.errors import InvalidImage

MAX_PIXELS = 50_000_000  # beyond this PIL treats the file as a decompression bomb
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}


@dataclass(frozen=True)
class DecodedImage:
    """An image ready to embed, with what imsrc stores about it."""

    image: Image.Image  # RGB, EXIF orientation applied
    width: int
    height: int
    format: str


def sha256(data: bytes) -> str:
    """Hex SHA-256 of the stored bytes, the key for de-duplication."""
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes) -> DecodedImage:
    """Decode bytes to an RGB image; raises InvalidImage with the reason when they are not a usable image."""
    if not data:
        raise InvalidImage("the file is empty")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "UNKNOWN"
            if fmt not in SUPPORTED_FORMATS:
                raise InvalidImage(f"unsupported image format {fmt}; use one of {', '.join(sorted(SUPPORTED_FORMATS))}")
            img.load()
    except UnidentifiedImageError:
        raise InvalidImage("not an image, or an image format that cannot be read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"image too large: more than {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image is corrupt or truncated ({exc})") from None
    rgb = to_rgb(ImageOps.exif_transpose(img))
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height, format=fmt)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled, transparency flattened onto white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def encode_png(array: np.ndarray) -> bytes:
    """Losslessly encode a uint8 HxW or HxWx3 array (dataset pixels) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# Truncated files are an error, not something to pad with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
