"""A region of the query: crop a decoded query image to a rectangle, then rotate and flip it, before embedding.

Coordinates are in the upright original image (as a browser shows it): `x,y,w,h` in pixels when all four are whole
numbers, or as fractions of the width and height when any has a decimal point (`0.5,0,0.5,0.5` is the top-right
quarter). Rotation is clockwise; the crop is taken first, then the rotation, then the flip.
"""
import re
from dataclasses import dataclass

from PIL import Image

from backend.embedding.decode import MAX_ASPECT, DecodedImage
from backend.errors import InvalidQuery

ROTATIONS = {0: None, 90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
FLIPS = {"horizontal": Image.Transpose.FLIP_LEFT_RIGHT, "vertical": Image.Transpose.FLIP_TOP_BOTTOM}
CROP_PATTERN = r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){3}\s*$"
MIN_SIDE = 8  # pixels of the decoded image a region must keep on each side: fewer is no picture to search with


class InvalidRegion(InvalidQuery):
    """A crop, rotation or flip that cannot be applied."""


@dataclass(frozen=True)
class QueryEdit:
    """What to do to a query image before embedding it."""

    crop: tuple[float, float, float, float] | None = None  # x, y, w, h
    fractions: bool = False  # crop in fractions of the image's width and height, not pixels
    rotate: int = 0  # degrees clockwise: 0, 90, 180 or 270
    flip: str | None = None  # "horizontal" or "vertical"

    @classmethod
    def parse(cls, crop: str | None = None, rotate: int = 0, flip: str | None = None) -> "QueryEdit | None":
        """From the API's parameters; None when they ask for nothing."""
        if rotate not in ROTATIONS:
            raise InvalidRegion(f"rotate takes 0, 90, 180 or 270 (degrees clockwise), not {rotate}")
        if flip is not None and flip not in FLIPS:
            raise InvalidRegion(f"flip takes horizontal or vertical, not {flip!r:.40}")
        box, fractions = None, False
        if crop is not None:
            if not re.match(CROP_PATTERN, crop):
                raise InvalidRegion(f"crop takes x,y,w,h: four pixel counts, or fractions of the image such as "
                                    f"0.5,0,0.5,0.5; not {crop!r:.60}")
            fractions = "." in crop
            box = tuple(float(v) for v in crop.split(","))
            if box[2] <= 0 or box[3] <= 0 or (fractions and max(box) > 1):
                raise InvalidRegion("crop: the width and height must be positive, and fractions at most 1")
        if box is None and not rotate and flip is None:
            return None
        return cls(box, fractions, rotate, flip)

    def apply(self, decoded: DecodedImage) -> Image.Image:
        """The edited query image."""
        image = decoded.image
        if self.crop is not None:
            image = image.crop(self._box(decoded))
        if ROTATIONS[self.rotate] is not None:
            image = image.transpose(ROTATIONS[self.rotate])
        return image.transpose(FLIPS[self.flip]) if self.flip else image

    def _box(self, decoded: DecodedImage) -> tuple[int, int, int, int]:
        """The crop in the decoded image's pixels. Decoding keeps the centre MAX_ASPECT:1 part of a very long image
        and shrinks it: the region, in the original's coordinates, is mapped onto what was kept (all of it when the
        decoded image has the original's shape, as a picture handed to the Python API does)."""
        width, height = decoded.width, decoded.height
        x, y, w, h = self.crop
        if self.fractions:
            x, y, w, h = x * width, y * height, w * width, h * height
        kept_w, kept_h = width, height
        if abs(decoded.image.width / decoded.image.height - width / height) > 0.02 * width / height:
            kept_w, kept_h = min(width, height * MAX_ASPECT), min(height, width * MAX_ASPECT)  # the centre was kept
        left, top = (width - kept_w) / 2, (height - kept_h) / 2
        scale_x, scale_y = decoded.image.width / kept_w, decoded.image.height / kept_h
        x0, y0 = max(x, left), max(y, top)
        x1, y1 = min(x + w, left + kept_w), min(y + h, top + kept_h)
        box = (round((x0 - left) * scale_x), round((y0 - top) * scale_y), round((x1 - left) * scale_x),
               round((y1 - top) * scale_y))
        if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
            raise InvalidRegion(f"crop: the region {x:.0f},{y:.0f},{w:.0f},{h:.0f} leaves less than {MIN_SIDE} pixels "
                                f"a side of the {width}x{height} image (is it outside the image?)")
        return box
