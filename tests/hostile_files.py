"""A generated corpus of hostile and awkward image files: extreme aspect ratios, bombs, every mode and bit depth,
animations, truncations, lying extensions and polyglots. Each file says whether a careful decoder should accept it."""
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class HostileFile:
    """A file to try, and whether it is a valid image (accepted) or not (refused with a specific 4xx)."""

    name: str
    data: bytes
    valid: bool


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb(width: int, height: int) -> bytes:
    """A real PNG of width x height 1-bit pixels, all zero: a few KB that decode to width*height pixels."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(min(height, 1))) + compressor.flush()
    # The IDAT above holds one row only: enough for PIL to learn the size; a decoder that trusts it explodes.
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _png_chunk_flood(chunks: int) -> bytes:
    """A real 32x32 PNG with `chunks` empty private ancillary chunks before its image data (12 bytes each): a
    decoder that walks them one at a time takes seconds."""
    png = _save(Image.new("RGB", (32, 32), (200, 30, 30)), "PNG")
    header = len(b"\x89PNG\r\n\x1a\n") + 25  # the signature and IHDR
    return png[:header] + _png_chunk(b"frOg", b"") * chunks + png[header:]


def _jpeg_scan_bomb(size: int, repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat is one more pass over the whole image."""
    data = _save(Image.new("RGB", (size, size), (90, 30, 200)), "JPEG", progressive=True, quality=95)
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats + data[end:]


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def _multiscan_jpeg(size: int, components: int) -> bytes:
    """A baseline (not progressive) JPEG with one scan per component: libjpeg then buffers every coefficient."""
    dc_bits, ac_bits = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0] * 15 + [1]
    frame = struct.pack(">BHHB", 8, size, size, components) + b"".join(bytes([c + 1, 0x11, 0]) for c in range(components))
    data = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64)) + _segment(0xC0, frame)
    data += _segment(0xC4, b"\x00" + bytes(dc_bits) + bytes(range(12)) + b"\x10" + bytes(ac_bits) + b"\x00")
    for c in range(components):
        data += _segment(0xDA, bytes([1, c + 1, 0x00, 0, 63, 0])) + b"\x00" * 64
    return data + b"\xff\xd9"


def _rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit run-length-encoded BMP of width x height pixels in a few hundred bytes."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    rle = b"\x01\x05\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + dib + palette + rle


def _animated(fmt: str, frames: int, size=(64, 64)) -> bytes:
    images = [Image.new("RGB", size, (i * 7 % 256, 40, 200)) for i in range(frames)]
    return _save(images[0], fmt, save_all=True, append_images=images[1:], duration=20, loop=0)


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.new("RGB", (60, 30), (200, 30, 30)), "JPEG", exif=exif.tobytes())


def _noise(size, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(sum(size))
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def corpus() -> list[HostileFile]:
    """At least 40 files, each under 10 MB."""
    png = _save(_noise((64, 48)), "PNG")
    jpeg = _save(_noise((64, 48)), "JPEG")
    gif = _save(_noise((64, 48)).convert("P"), "GIF")
    webp = _save(_noise((64, 48)), "WEBP")
    sixteen = Image.fromarray(np.zeros((7000, 7000), dtype=np.uint16))
    files = [
        # extreme aspect ratios, both ways
        HostileFile("wide-1x5000.png", _save(Image.new("L", (5000, 1), 90), "PNG"), True),
        HostileFile("tall-1x20000.png", _save(Image.new("L", (1, 20000), 90), "PNG"), True),
        HostileFile("wide-20000x1.png", _save(Image.new("L", (20000, 1), 90), "PNG"), True),
        HostileFile("wide-60000x2.png", _save(Image.new("RGB", (60000, 2), (9, 9, 9)), "PNG"), True),
        HostileFile("tall-3x9000.jpg", _save(Image.new("RGB", (3, 9000), (90, 9, 9)), "JPEG"), True),
        HostileFile("ribbon-6000x40.gif", _save(Image.new("P", (6000, 40), 3), "GIF"), True),
        # large but legal
        HostileFile("big-7000x7000-16bit.png", _save(sixteen, "PNG"), True),
        HostileFile("big-5000x5000-rgba.png", _save(Image.new("RGBA", (5000, 5000), (1, 2, 3, 100)), "PNG"), True),
        HostileFile("big-8000x5000.jpg", _save(Image.new("RGB", (8000, 5000), (30, 60, 90)), "JPEG", quality=50), True),
        HostileFile("big-6000x1000-float.tiff", _save(Image.new("F", (6000, 1000), 0.5), "TIFF", compression="tiff_deflate"), False),
        # every mode and bit depth
        HostileFile("cmyk.jpg", _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), True),
        HostileFile("palette.png", _save(_noise((50, 50)).convert("P"), "PNG"), True),
        HostileFile("palette-transparent.png", _save(Image.new("P", (50, 50), 0), "PNG", transparency=0), True),
        HostileFile("grey-alpha.png", _save(Image.new("LA", (50, 50), (100, 50)), "PNG"), True),
        HostileFile("bilevel.png", _save(Image.new("1", (50, 50), 1), "PNG"), True),
        HostileFile("bilevel-big.png", _save(Image.new("1", (6000, 6000), 0), "PNG"), True),
        HostileFile("sixteen-bit-grey.tiff", _save(Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64)), "TIFF"), False),
        HostileFile("grey.jpg", _save(Image.new("L", (40, 40), 80), "JPEG"), True),
        HostileFile("progressive.jpg", _save(_noise((300, 200)), "JPEG", progressive=True), True),
        HostileFile("lossless.webp", _save(_noise((64, 64)), "WEBP", lossless=True), True),
        HostileFile("rgba.webp", _save(Image.new("RGBA", (64, 64), (0, 0, 255, 10)), "WEBP"), True),
        HostileFile("tiny-1x1.png", _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), True),
        HostileFile("tiny-1x1.gif", _save(Image.new("P", (1, 1), 0), "GIF"), True),
        HostileFile("bmp-24.bmp", _save(_noise((30, 20)), "BMP"), True),
        HostileFile("multipage.tiff", _save(Image.new("RGB", (40, 40)), "TIFF", save_all=True, compression="tiff_deflate",
                                            append_images=[Image.new("RGB", (4000, 4000))] * 3), False),
        # orientation
        *[HostileFile(f"exif-orientation-{o}.jpg", _exif_jpeg(o), True) for o in (2, 3, 5, 6, 8)],
        # animations
        HostileFile("animated-300-frames.gif", _animated("GIF", 300), True),
        HostileFile("animated.png", _animated("PNG", 40), True),
        HostileFile("animated.webp", _animated("WEBP", 40), True),
        # lying extensions and polyglots
        HostileFile("png-named.jpg", png, True),
        HostileFile("jpeg-named.gif", jpeg, True),
        HostileFile("gif-with-zip-appended.gif", gif + b"PK\x03\x04" + b"\x00" * 200, True),
        HostileFile("jpeg-with-html-appended.jpg", jpeg + b"<html><script>alert(1)</script></html>", True),
        HostileFile("html-named.jpg", b"<!doctype html><html><body>hi</body></html>", False),
        HostileFile("svg-named.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', False),
        HostileFile("pdf-named.png", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", False),
        HostileFile("zip-named.png", b"PK\x03\x04" + b"\x00" * 100, False),
        HostileFile("ico.png", _save(Image.new("RGB", (16, 16)), "ICO"), False),
        # bombs
        HostileFile("too-big-6000x6000-rgba.png", _save(Image.new("RGBA", (6000, 6000), (1, 2, 3, 4)), "PNG"), False),
        HostileFile("bomb-png-50000x50000.png", _png_bomb(50000, 50000), False),
        HostileFile("bomb-png-100000x1000.png", _png_bomb(100000, 1000), False),
        HostileFile("bomb-gif-screen-65535.gif", gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:], False),
        HostileFile("bomb-webp-5100x5100-1kb.webp", _save(Image.new("RGB", (5100, 5100), (10, 200, 30)), "WEBP",
                                                         lossless=True), False),
        HostileFile("bomb-jpeg-multiscan-7000.jpg", _multiscan_jpeg(7000, 3), False),
        HostileFile("bomb-bmp-rle-7000x7000.bmp", _rle_bmp(7000, 7000), False),
        HostileFile("rle-bmp-600x400.bmp", _rle_bmp(600, 400), True),
        HostileFile("webp-2000x1500.webp", _save(_noise((200, 150)).resize((2000, 1500)), "WEBP"), True),
        HostileFile("bomb-jpeg-5000-scans.jpg", _jpeg_scan_bomb(2000, 5000), False),
        HostileFile("progressive-7000x7000.jpg", _save(Image.new("RGB", (7000, 7000), (9, 90, 9)), "JPEG",
                                                       progressive=True, subsampling=0), False),
        HostileFile("progressive-4000x3000.jpg", _save(_noise((400, 300)).resize((4000, 3000)), "JPEG",
                                                       progressive=True), True),
        HostileFile("bomb-jpeg-65000x65000.jpg", jpeg.replace(b"\x00\x30\x00\x40", b"\xfd\xe8\xfd\xe8", 1), False),
        # truncated and damaged
        HostileFile("truncated.png", png[: len(png) // 2], False),
        HostileFile("truncated.jpg", jpeg[: len(jpeg) // 2], False),
        HostileFile("truncated.gif", gif[:40], False),
        HostileFile("truncated.webp", webp[:30], False),
        HostileFile("header-only.png", png[:33], False),
        HostileFile("bad-crc.png", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], False),
        HostileFile("chunk-flood-700k.png", _png_chunk_flood(700_000), False),
        HostileFile("zero-width.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0))
                    + _png_chunk(b"IEND", b""), False),
        HostileFile("empty.png", b"", False),
        HostileFile("random.jpg", np.random.default_rng(7).bytes(5000), False),
        HostileFile("text.png", b"definitely not an image\n" * 10, False),
    ]
    assert all(len(f.data) < 10 * 1024 * 1024 for f in files), [(f.name, len(f.data)) for f in files if len(f.data) >= 10 * 1024 * 1024]
    return files
