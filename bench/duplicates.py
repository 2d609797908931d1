"""Near-duplicate grouping: precision and recall against a generated set, per similarity threshold.

Real photos shipped by scikit-image, each stored as it is and as five altered copies (re-encoded as a poor JPEG,
resized to half, cropped to 85%, colour-shifted, and cropped then shrunk), mixed with distinct images: the other
photos, and Fashion-MNIST test images (many alike, none the same picture). A predicted pair is two images in one
group; a true pair, two copies of one photo. Prints a table and writes JSON:

    python bench/duplicates.py --json bench/results/duplicates.json      # a fresh embedded database in a temp folder
"""
import argparse
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, write_json
from PIL import Image, ImageEnhance

ORIGINALS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock", "grass",
             "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina")
DISTINCT = ("cell", "horse", "logo", "colorwheel", "checkerboard", "microaneurysms", "shepp_logan_phantom", "eagle",
            "skin", "lily", "kidney", "human_mitosis")
THRESHOLDS = (0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def variants(photo: Image.Image) -> list[bytes]:
    """The photo and five altered copies of it."""
    w, h = photo.size
    crop = photo.crop((int(w * 0.1), int(h * 0.05), int(w * 0.95), int(h * 0.9)))
    shifted = ImageEnhance.Brightness(ImageEnhance.Color(photo).enhance(1.6)).enhance(1.15)
    return [encoded(photo), encoded(photo, "JPEG", quality=25), encoded(photo.resize((w // 2, h // 2))),
            encoded(crop), encoded(shifted), encoded(crop.resize((crop.width * 2 // 3, crop.height * 2 // 3)))]


def photo(name: str) -> Image.Image | None:
    from skimage import data

    try:
        array = getattr(data, name)()
    except Exception:  # noqa: BLE001 - a photo this scikit-image lacks (or cannot read) is left out
        return None
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim not in (2, 3) or array.dtype == bool:
        array = (np.asarray(array, np.float32) * 255).astype(np.uint8) if array.dtype == bool else array
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] not in (3,):
        return None
    return Image.fromarray(array).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fashion", type=int, default=200, help="Fashion-MNIST test images among the distinct ones")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="imsrc-duplicates-"))
    os.environ.setdefault("MODEL_NAME", "efficientnet_lite0")
    os.environ["IMSRC_ENV_FILE"] = os.devnull

    from backend.pipeline.datasets import load_dataset, select_balanced  # noqa: E402 - after the environment is set
    from backend.search.duplicates import groups, similar_pairs
    from backend.service.image_search import ImageSearch

    search = ImageSearch.open()
    truth: dict[int, str] = {}  # image id -> the photo it is a copy of
    started = time.perf_counter()
    for name in ORIGINALS:
        if (picture := photo(name)) is None:
            continue
        for data in variants(picture):
            truth[search.add_image(data, "photos", original_name=name).image_id] = name
    distinct = [encoded(p) for name in DISTINCT if (p := photo(name)) is not None]
    distinct += [item.read() for item in select_balanced(load_dataset("fashion-mnist", "test", None), args.fashion)]
    for n, data in enumerate(distinct):
        search.add_image(data, "others", original_name=f"distinct-{n}")
    stored_s = time.perf_counter() - started
    true_pairs = {(a, b) for a, b in itertools.combinations(sorted(truth), 2) if truth[a] == truth[b]}
    rows = []
    started = time.perf_counter()
    everything = similar_pairs(search.index, min(THRESHOLDS))
    find_s = time.perf_counter() - started
    for threshold in THRESHOLDS:
        found = groups({p: s for p, s in everything.items() if s >= threshold}, set())
        predicted = {pair for g in found for pair in itertools.combinations(g, 2)}
        hit = len(predicted & true_pairs)
        precision = hit / len(predicted) if predicted else 1.0
        recall = hit / len(true_pairs)
        rows.append({"threshold": threshold, "groups": len(found), "predicted_pairs": len(predicted),
                     "precision": round(precision, 4), "recall": round(recall, 4),
                     "f1": round(2 * precision * recall / (precision + recall), 4) if hit else 0.0})
    print(f"{len(truth)} copies of {len(set(truth.values()))} photos, {len(distinct)} distinct images, "
          f"{len(true_pairs)} true pairs; stored in {stored_s:.0f} s, pairs found in {find_s:.2f} s")
    print(f"{'threshold':>9} {'groups':>6} {'pairs':>6} {'precision':>9} {'recall':>7} {'F1':>6}")
    for r in rows:
        print(f"{r['threshold']:>9} {r['groups']:>6} {r['predicted_pairs']:>6} {r['precision']:>9.4f} "
              f"{r['recall']:>7.4f} {r['f1']:>6.4f}")
    write_json(args.json, {"machine": machine(), "model": search.embedder.name, "copies": len(truth),
                           "photos": len(set(truth.values())), "distinct": len(distinct),
                           "true_pairs": len(true_pairs), "seconds_to_find_pairs": round(find_s, 3), "rows": rows})
    search.close()


if __name__ == "__main__":
    main()
