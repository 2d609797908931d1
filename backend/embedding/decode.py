"""Decoding messy real-world image bytes into 8-bit RGB or grayscale PIL images, and hashing them."""
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from backend.errors import InvalidImage, UnsupportedFormat

MAX_PIXELS = 50_000_000  # beyond this PIL treats the file as a decompression bomb
MAX_DECODED_BYTES = 100 * 1024 * 1024  # what one decoded image may take in memory (PIL: 1, 2 or 4 bytes a pixel)
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"}
# Only these plugins ever parse an upload. TIFF is left out on purpose: its tile and strip tables let a 5 KB file
# make libtiff allocate gigabytes, and Pillow builds a Python object per strip before a pixel is read.
_OPENERS = ["JPEG", "PNG", "WEBP", "GIF", "BMP"]
# Formats imsrc does not read, told by their first bytes (never parsed: only _OPENERS parse an upload), so that
# they are answered "unsupported" (415) rather than "not an image".
_KNOWN_UNSUPPORTED = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD",
                      b"\x00\x00\x00\x0cjP": "JPEG 2000", b"%PDF": "PDF", b"DDS ": "DDS", b"\x01\xda": "SGI",
                      b"\xc5\xd0\xd3\xc6": "EPS", b"qoif": "QOI", b"\xff\x0a": "JPEG XL",
                      b"\x00\x00\x00\x0cJXL ": "JPEG XL", b"gimp xcf": "XCF"}
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
               b"avis": "AVIF"}  # the brand of an ISO media file's ftyp box (a phone's photo)
# Decoding cost in bytes per pixel where it is not the decoded image's own: libwebp decodes to an RGBA canvas
# that Pillow then copies and converts (measured: about 15 bytes a pixel at peak).
_WEBP_BYTES_PER_PIXEL = 16
MAX_RLE_BMP_PIXELS = 4_000_000  # Pillow decodes RLE bitmaps in pure Python: seconds per megapixel
# Every model resizes the short side to 256-292 px and centre-crops a square, so decoding shrinks a larger
# image by a whole factor to a short side under 2 x WORKING_SIDE px, and keeps a long side of at most
# MAX_ASPECT times the short one: the crop the model takes is unchanged, and a 1x20000 image no longer
# stretches to 256x5,120,000 px in preprocessing.
WORKING_SIDE = 512
MAX_ASPECT = 4
ORIENTATION = 0x0112  # the EXIF tag
_TRANSPOSE = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
              4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_270],
              7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_90]}
STRIP_PIXELS = 4_000_000  # source pixels shrunk at a time
# A progressive JPEG is decoded scan by scan over a buffer of all its DCT coefficients (2 bytes each) whatever
# the output scale, and a crafted one can hold thousands of scans: both are bounded before decoding.
MAX_JPEG_SCANS = 100  # libjpeg-turbo's djpeg suggests -maxscans for untrusted files; real files have 1 to ~12
# Pillow walks a PNG chunk by chunk in Python (about 9 us a chunk): 700,000 empty chunks in an 8 MB file took 6 s
# to decode. Real PNGs have a handful of chunks besides their image data, whose chunks libpng writes 8 KiB each
# (a 10 MB upload: about 1,300); the count is checked before Pillow sees the file.
MAX_PNG_CHUNKS = 20_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class DecodedImage:
    """An image ready to embed (short side under 2 x WORKING_SIDE px), with what imsrc stores about the original."""

    image: Image.Image  # RGB or L (8-bit gray), EXIF orientation applied, centre-cropped and reduced for the model
    width: int  # the original's, upright
    height: int
    format: str


def sha256(data: bytes) -> str:
    """Hex SHA-256 of the stored bytes, the key for de-duplication."""
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes) -> DecodedImage:
    """Decode bytes to a small 8-bit RGB or grayscale image for the model; raises InvalidImage with the reason
    when they are not a usable image. Memory is bounded by MAX_PIXELS whatever the file: JPEGs decode at a reduced
    scale."""
    if not data:
        raise InvalidImage("the file is empty")
    if data.startswith(_PNG_SIGNATURE) and png_chunks(data, MAX_PNG_CHUNKS) > MAX_PNG_CHUNKS:
        raise InvalidImage(f"PNG with more than {MAX_PNG_CHUNKS:,} chunks: more than imsrc decodes")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_OPENERS)
            fmt = img.format or "UNKNOWN"
            if fmt not in SUPPORTED_FORMATS:
                raise UnsupportedFormat(f"unsupported image format {fmt}; use one of {', '.join(sorted(SUPPORTED_FORMATS))}")
            width, height = img.size
            short = min(width, height)
            if fmt in ("JPEG", "MPO"):
                _check_jpeg(img, data)
                if short > WORKING_SIDE:  # let libjpeg decode at 1/2, 1/4 or 1/8 scale
                    img.draft(img.mode, (width * WORKING_SIDE // short, height * WORKING_SIDE // short))
            if fmt == "BMP" and img.info.get("compression") in (1, 2) and width * height > MAX_RLE_BMP_PIXELS:
                raise InvalidImage(f"run-length-encoded BMP of {width}x{height} pixels: more than the "
                                   f"{MAX_RLE_BMP_PIXELS:,} imsrc decodes; save it as PNG")
            needed = img.width * img.height * (_WEBP_BYTES_PER_PIXEL if fmt == "WEBP" else _bytes_per_pixel(img.mode))
            if needed > MAX_DECODED_BYTES:
                raise InvalidImage(f"image too large: {width}x{height} {img.mode} pixels take {needed / 2**20:,.0f} MiB "
                                   f"to decode, more than the {MAX_DECODED_BYTES / 2**20:,.0f} MiB allowed")
            img.load()
            orientation = _orientation(img)  # only now: a PNG's getexif() decodes the whole image to find it
            small = _for_model(img)
    except UnidentifiedImageError:
        known = unsupported_format(data)
        if known:
            raise UnsupportedFormat(f"unsupported image format {known}; use one of {', '.join(sorted(SUPPORTED_FORMATS))}") \
                from None
        raise InvalidImage("not an image, or an image format that cannot be read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"image too large: more than {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"the image is corrupt or truncated ({exc})") from None
    for method in _TRANSPOSE.get(orientation, []):
        small = small.transpose(method)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return DecodedImage(image=to_8bit(small), width=width, height=height, format=fmt)


def unsupported_format(data: bytes) -> str | None:
    """The name of the image format imsrc does not read that `data` is in, from its first bytes; None if unknown."""
    if data.endswith(b"TRUEVISION-XFILE.\x00"):  # TGA 2.0's footer
        return "TGA"
    known = next((name for magic, name in _KNOWN_UNSUPPORTED.items() if data.startswith(magic)), None)
    if known:
        return known
    if data.startswith(b"\x00\x00\x02\x00") and data[4:6] != b"\x00\x00":  # a count of cursors: a TGA starts so too
        return "CUR"
    if data.startswith(b"%!"):  # PostScript; EPS says so on its first line
        return "EPS" if b"EPSF" in data[:64].split(b"\n")[0] else "PostScript"
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        return _ISO_BRANDS[data[8:12]]
    if len(data) >= 128 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] in (0, 1) \
            and data[3] in (1, 2, 4, 8):  # PCX: manufacturer 10, version, encoding, bits per plane
        return "PCX"
    if _is_tga(data):
        return "TGA"
    return None


def _is_tga(data: bytes) -> bool:
    # An older TGA has no magic number and no footer: an 18-byte header whose fields all hold values TGA allows.
    if len(data) < 18:
        return False
    colour_map, kind, depth = data[1], data[2], data[16]
    width, height = int.from_bytes(data[12:14], "little"), int.from_bytes(data[14:16], "little")
    return (colour_map in (0, 1) and kind in ((1, 9) if colour_map else (2, 3, 10, 11))
            and depth in (1, 8, 15, 16, 24, 32) and width > 0 and height > 0)


def png_chunks(data: bytes, limit: int) -> int:
    """How many chunks the PNG has, counting up to limit + 1 (a walk over their lengths: no chunk is read)."""
    chunks, i = 0, len(_PNG_SIGNATURE)
    while i + 8 <= len(data) and chunks <= limit:
        chunks += 1
        if data[i + 4:i + 8] == b"IEND":
            break
        i += 12 + int.from_bytes(data[i:i + 4], "big")  # length, type, data, CRC
    return chunks


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # ends a scan's entropy-coded data


def jpeg_scans(data: bytes, limit: int) -> int:
    """How many scans (start-of-scan segments) the JPEG's main image has, counting up to limit + 1.

    Walks the segments, so a thumbnail inside an APP1 (EXIF) segment does not count."""
    scans, i = 0, 2
    while i + 4 <= len(data) and scans <= limit:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xD9:  # end of image
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, restart, TEM: no length
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, i)
            i = found.start() if found else len(data)
    return scans


def _check_jpeg(img: Image.Image, data: bytes) -> None:
    """Refuse a JPEG whose decoding would take unbounded time (too many scans) or memory (coefficient buffer)."""
    scans = jpeg_scans(data, MAX_JPEG_SCANS)
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(f"JPEG with more than {MAX_JPEG_SCANS} scans: more than imsrc decodes")
    if scans > 1 or img.info.get("progressive"):  # libjpeg then buffers every DCT coefficient of the image
        layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * len(img.getbands())
        h_max, v_max = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
        blocks = sum(-(-img.width * h // (8 * h_max)) * -(-img.height * v // (8 * v_max)) for _, h, v, _ in layers)
        if blocks * 64 * 2 > MAX_DECODED_BYTES:
            raise InvalidImage(f"image too large: a {img.width}x{img.height} JPEG in {scans} scans takes "
                               f"{blocks * 128 / 2**20:,.0f} MiB of coefficients to decode, more than the "
                               f"{MAX_DECODED_BYTES / 2**20:,.0f} MiB allowed")


def _bytes_per_pixel(mode: str) -> int:
    # How PIL stores a decoded pixel: one byte for 8-bit single-band modes, two for 16-bit, else four.
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block only loses the orientation, not the image
        return 1


def _for_model(img: Image.Image) -> Image.Image:
    """The centre MAX_ASPECT:1 part of the image, shrunk by a whole factor to under 2 x WORKING_SIDE px short side."""
    w, h = img.size
    short = min(w, h)
    long_kept = min(max(w, h), short * MAX_ASPECT)
    cw, ch = (long_kept, short) if w >= h else (short, long_kept)
    left, top = (w - cw) // 2, (h - ch) // 2
    factor = max(1, short // WORKING_SIDE)
    if factor == 1:
        return img if (cw, ch) == (w, h) else img.crop((left, top, left + cw, top + ch))
    # Strip by strip: converting or averaging the whole image at once would copy all of it (Pillow premultiplies
    # RGBA into a full-size RGBa copy), and one decoded image is already the largest thing a request holds.
    out_w, out_h = cw // factor, ch // factor
    rows = max(1, STRIP_PIXELS // (cw * factor))  # output rows per strip
    parts = []
    for y in range(0, out_h, rows):
        n = min(rows, out_h - y)
        strip = _averageable(img.crop((left, top + y * factor, left + out_w * factor, top + (y + n) * factor)))
        parts.append(strip.reduce(factor))
    out = Image.new(parts[0].mode, (out_w, out_h))
    for k, part in enumerate(parts):
        out.paste(part, (0, k * rows))
    return out


def _averageable(img: Image.Image) -> Image.Image:
    """The image in a mode whose pixel values can be averaged (palette indices, bilevel and 16-bit cannot)."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):
        return img.convert("I")
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, or 8-bit grayscale (L) where it has no colour: 16-bit and float scaled,
    transparency flattened onto white, CMYK converted. Grayscale stays one band so that resizing it for the model
    costs a third (backend.embedding.pixels makes the three equal channels)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))  # float32, in place: one copy of the image at most
        lo, hi = float(arr.min()), float(arr.max())
        arr -= lo
        arr *= 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(np.rint(arr, out=arr).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def encode_png(array: np.ndarray) -> bytes:
    """Losslessly encode a uint8 HxW or HxWx3 array (dataset pixels) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# Truncated files are an error, not something to pad with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
