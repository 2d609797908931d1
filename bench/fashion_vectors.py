"""Realistic vectors at scale, made offline and cached: Fashion-MNIST's training images under seeded augmentations,
embedded by a real model, with the test split (as it is) as queries.

Version 0 of a training image is the image itself; version v > 0 is drawn from np.random.default_rng([seed, i, v]):
a crop of 50-100% of its area (aspect 3:4 to 4:3), a mirror (half of them), a rotation (up to 30 degrees either
way), a zoom out (the garment at 70-100% of the frame, off-centre) and a colour (the gray image mapped between
two random colours, then brightness and contrast within 30%). So any version can be made again alone, and the
vectors of a garment's versions are near each other without being copies, as a shop's photos of one item are.

Cached under CACHE/<model>-<copies>x-seed<seed>/: one float32 .npy of CHUNK vectors per chunk, in order, then
labels.npy, queries.npy and query-labels.npy; a run stopped part-way goes on from the first missing chunk.

Usage: python bench/fashion_vectors.py [--copies 17] [--model efficientnet_lite0] [--cache DIR] [--limit N]
       [--json FILE]
"""
import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.pipeline.datasets import fashion_mnist_arrays  # noqa: E402
from bench.common import machine, write_json  # noqa: E402

CHUNK = 10_000  # vectors per cached file
BATCH = 64  # images per forward pass
DEFAULT_CACHE = Path.home() / ".cache" / "imsrc" / "bench-vectors"


def augmented(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One seeded variation of a 28 x 28 gray image, as an RGB picture (see the module docstring)."""
    side = image.shape[0]
    area, aspect = rng.uniform(0.5, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(side, max(8, round(side * math.sqrt(area * aspect))))
    h = min(side, max(8, round(side * math.sqrt(area / aspect))))
    x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
    picture = Image.fromarray(image, "L").crop((x, y, x + w, y + h)).resize((64, 64), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        picture = ImageOps.mirror(picture)
    picture = picture.rotate(rng.uniform(-30, 30), Image.Resampling.BILINEAR, fillcolor=0)
    frame = round(64 / rng.uniform(0.7, 1.0))  # zoomed out: the garment in a larger black frame, off-centre
    canvas = Image.new("L", (frame, frame), 0)
    canvas.paste(picture, (int(rng.integers(0, frame - 63)), int(rng.integers(0, frame - 63))))
    dark, light = rng.integers(0, 80, 3), rng.integers(150, 256, 3)
    picture = ImageOps.colorize(canvas, black=tuple(int(c) for c in dark), white=tuple(int(c) for c in light))
    picture = ImageEnhance.Brightness(picture).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(picture).enhance(rng.uniform(0.7, 1.3))


def version(images: np.ndarray, n: int, copies: int, seed: int) -> Image.Image:
    """Version n of the collection: training image n // copies, variation n % copies (0: as it is)."""
    i, v = divmod(n, copies)
    if v == 0:
        return Image.fromarray(images[i], "L")
    return augmented(images[i], np.random.default_rng([seed, i, v]))


def embed_all(embedder, pictures, total: int, label: str) -> np.ndarray:
    """Unit vectors (total, d) of pictures(start, stop) -> list of images, BATCH at a time; the next batch is made
    and preprocessed on another thread while the model runs."""
    out, started = [], time.perf_counter()
    starts = list(range(0, total, BATCH))
    prepare = lambda s: embedder.prepare(pictures(s, min(s + BATCH, total)))  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(prepare, starts[0]) if starts else None
        for k, start in enumerate(starts):
            batch = ahead.result()
            if k + 1 < len(starts):
                ahead = pool.submit(prepare, starts[k + 1])
            out.append(embedder.embed_prepared(batch))
    if total:
        print(f"    {label}: {total:,} in {time.perf_counter() - started:.0f} s", flush=True)
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def build(copies: int = 17, model: str = "efficientnet_lite0", seed: int = 0, cache: Path = DEFAULT_CACHE,
          limit: int | None = None, data_dir: Path | None = None) -> Path:
    """Make (or finish) the cached vectors of the first `limit` training images' versions (all 60,000 by default)
    and of the test images; returns their folder."""
    train, train_labels = fashion_mnist_arrays("train", data_dir)
    test, test_labels = fashion_mnist_arrays("test", data_dir)
    originals = len(train) if limit is None else min(limit, len(train))
    total = originals * copies
    folder = cache / f"{model}-{originals}x{copies}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = range(math.ceil(total / CHUNK))
    missing = [c for c in chunks if not (folder / f"chunk-{c:05d}.npy").is_file()]
    if not missing and (folder / "queries.npy").is_file():
        return folder
    from backend.embedding.models import create_embedder

    embedder = create_embedder(model).load()
    print(f"  {folder.name}: {total:,} vectors, {len(missing)} of {len(chunks)} chunks to embed "
          f"({embedder.runtime_reason})", flush=True)
    for c in missing:
        first, last = c * CHUNK, min((c + 1) * CHUNK, total)
        vectors = embed_all(embedder, lambda s, e: [version(train, first + n, copies, seed) for n in range(s, e)],
                            last - first, f"chunk {c + 1}/{len(chunks)}")
        partial = folder / f"chunk-{c:05d}.partial.npy"
        np.save(partial, vectors.astype(np.float32))
        partial.rename(folder / f"chunk-{c:05d}.npy")  # whole chunks only, also when the run is stopped
    np.save(folder / "labels.npy", np.repeat(train_labels[:originals].astype(np.int64), copies))
    queries = embed_all(embedder, lambda s, e: [Image.fromarray(a, "L") for a in test[s:e]], len(test), "queries")
    np.save(folder / "query-labels.npy", test_labels.astype(np.int64))
    np.save(folder / "queries.npy", queries.astype(np.float32))
    return folder


def load(folder: Path, mmap: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(the chunks' vectors in order, memory-mapped; labels (n,); query vectors; query labels) of a built folder."""
    chunks = sorted(folder.glob("chunk-[0-9][0-9][0-9][0-9][0-9].npy"))
    vectors = [np.load(path, mmap_mode="r" if mmap else None) for path in chunks]
    return vectors, np.load(folder / "labels.npy"), np.load(folder / "queries.npy"), \
        np.load(folder / "query-labels.npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=17, help="versions per training image (17: 1,020,000)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--limit", type=int, default=None, help="only the first N training images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    folder = build(args.copies, args.model, args.seed, args.cache, args.limit)
    vectors, labels, queries, _ = load(folder)
    count, dim = sum(len(v) for v in vectors), vectors[0].shape[1]
    print(f"{folder}: {count:,} x {dim} vectors, {len(queries):,} queries")
    write_json(args.json, {"machine": machine(), "folder": str(folder), "vectors": count, "dim": dim,
                           "queries": len(queries), "categories": int(labels.max()) + 1,
                           "seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
