"""Real images are messy: every mode and orientation decodes to an upright RGB image."""

import numpy as np
import pytest
from PIL import Image

from backend.embedding.decode import MAX_ASPECT, WORKING_SIDE, decode, jpeg_scans, to_8bit
from backend.errors import InvalidImage
from tests.helpers import png_bytes


def _exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG (wide) whose EXIF orientation 6 says: rotate 90 degrees to view (tall)."""
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return png_bytes(img, "JPEG", exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    return png_bytes(Image.fromarray(arr))  # uint16 -> mode I;16


MESSY = {
    "grayscale": lambda: png_bytes(Image.new("L", (30, 30), 128)),
    "palette": lambda: png_bytes(Image.new("RGB", (30, 30), (10, 200, 10)).convert("P", palette=Image.ADAPTIVE)),
    "rgba": lambda: png_bytes(Image.new("RGBA", (30, 30), (255, 0, 0, 0))),
    "cmyk": lambda: png_bytes(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG"),
    "16-bit": _sixteen_bit_png,
    "tiny": lambda: png_bytes(Image.new("L", (28, 28), 3)),
    "large": lambda: png_bytes(Image.new("RGB", (4000, 3000), (1, 2, 3)), "JPEG"),
    "gif": lambda: png_bytes(Image.new("P", (30, 30), 1), "GIF"),
    "webp": lambda: png_bytes(Image.new("RGB", (30, 30), (9, 9, 9)), "WEBP"),
    "bmp": lambda: png_bytes(Image.new("RGB", (30, 30), (9, 9, 9)), "BMP"),
}


@pytest.mark.parametrize("kind", MESSY)
def test_messy_images_decode_to_8bit_rgb_or_grayscale(kind):
    decoded = decode(MESSY[kind]())
    # Grayscale stays one band (a third of the resizing); everything with colour or transparency becomes RGB
    assert decoded.image.mode == ("L" if kind in ("grayscale", "tiny", "16-bit") else "RGB")
    if kind == "large":  # reduced for the model; the stored size stays the original's
        assert (decoded.width, decoded.height) == (4000, 3000) and min(decoded.image.size) < 2 * WORKING_SIDE
    else:
        assert decoded.image.size == (decoded.width, decoded.height)


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (3, 5000), (9000, 600)])
def test_extreme_aspect_ratios_are_centre_cropped_not_stretched(size):
    decoded = decode(png_bytes(Image.new("L", size, 90)))
    assert (decoded.width, decoded.height) == size
    w, h = decoded.image.size
    assert max(w, h) <= MAX_ASPECT * min(w, h) and min(w, h) == min(size) // max(1, min(size) // WORKING_SIDE)


@pytest.mark.parametrize("mode", ["P", "I;16", "1", "RGBA"])
def test_large_images_of_every_mode_shrink(mode):
    img = Image.new(mode, (2100, 1500))
    decoded = decode(png_bytes(img))
    assert decoded.image.mode == ("L" if mode in ("I;16", "1") else "RGB")
    assert min(decoded.image.size) == 1500 // (1500 // WORKING_SIDE)


@pytest.mark.slow
def test_the_centre_crop_does_not_change_what_the_model_sees():
    """The models centre-crop a square, so cutting a wide image to MAX_ASPECT:1 first leaves the embedding as is."""
    from backend.embedding.models import create_embedder

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (60, 60 * (MAX_ASPECT + 3), 3), dtype=np.uint8))
    decoded = decode(png_bytes(wide))
    assert decoded.image.size == (60 * MAX_ASPECT, 60)
    model = create_embedder("efficientnet_lite0", device="cpu")
    direct, cropped = model.embed([wide, decoded.image])
    assert float(direct @ cropped) > 0.999


def test_transparent_pixels_become_white_and_cmyk_keeps_its_colour():
    assert decode(MESSY["rgba"]()).image.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = decode(MESSY["cmyk"]()).image.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 is red


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.asarray(decode(_sixteen_bit_png()).image)  # one band, 8-bit
    assert arr.ndim == 2 and arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) > 200


def test_exif_orientation_is_applied():
    decoded = decode(_exif_rotated_jpeg())
    assert (decoded.width, decoded.height) == (20, 40)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"definitely not an image", "not an image"),
    (MESSY["large"]()[:5000], "corrupt or truncated"),
    (png_bytes(Image.new("RGB", (8, 8)), "TIFF"), "unsupported image format TIFF"),
])
def test_bad_bytes_raise_a_specific_error(data, reason):
    with pytest.raises(InvalidImage, match=reason):
        decode(data)


def test_to_8bit_handles_float_images():
    img = Image.fromarray(np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10), )  # float32 -> mode F
    out = np.asarray(to_8bit(img))
    assert out.shape == (10, 10) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_jpeg_scans_are_counted_by_segments_not_by_bytes():
    baseline = png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    progressive = png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG", progressive=True)
    assert jpeg_scans(baseline, 100) == 1 and 2 < jpeg_scans(progressive, 100) < 20
    # An EXIF-like APP1 segment holding a whole JPEG (a thumbnail, with its own scan) is skipped, not counted.
    app1 = b"\xff\xe1" + (len(baseline) + 2).to_bytes(2, "big") + baseline
    assert jpeg_scans(baseline[:2] + app1 + baseline[2:], 100) == 1
    assert decode(baseline[:2] + app1 + baseline[2:]).width == 64
