"""Ingestion engines side by side: the single-process pipeline against Ray Data on this one machine.

Usage: python bench/ingest.py [--images 4000] [--model efficientnet_lite0] [--batch-size 16] [--json FILE]

The same Fashion-MNIST images (FASHION_MNIST_DIR) go into a fresh throw-away database per engine on the configured
PostgreSQL (the embedded one, or DATABASE_URL's server); the model is loaded once here, so both engines embed with
the same precision and engine. Ray gets a local cluster of all this machine's cores, started before the clock runs
(as a long-lived cluster would be). A thread counts the stored vectors four times a second, which gives:
- wall: from the call to the last batch stored (Ray's includes starting its actors and loading the model in them);
- steady: images/s between 10% and 90% of the vectors stored (start-up left out);
- the store path alone (`write ceiling`): the same images with made-up vectors through the engines' transactional
  write, no model: the most one writer (the single process, or Ray's driver) can store, whatever embeds.
Prints a table, the ratio Ray/single, and a per-core rate to estimate clusters with; --json writes it all.
"""
import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.config import settings  # noqa: E402
from backend.embedding.decode import decode, sha256  # noqa: E402
from backend.embedding.models import get_embedder  # noqa: E402
from backend.pipeline.datasets import load_dataset, select_balanced  # noqa: E402
from backend.pipeline.ingest import IngestReport, Prepared, ingest, store_batch  # noqa: E402
from backend.storage.images import NewImage  # noqa: E402
from bench.common import fresh_database, machine, write_json  # noqa: E402


class StoredCounter:
    """Counts the vectors in a database 4 times a second while an engine runs."""

    def __init__(self, sessions: sessionmaker):
        self.sessions, self.samples, self._stop = sessions, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with self.sessions() as s:
                self.samples.append((time.perf_counter(), s.scalar(sa.text("SELECT count(*) FROM embeddings"))))
            self._stop.wait(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def steady_rate(self, total: int) -> float:
        """Images/s between the samples at 10% and 90% of `total` stored; NaN when the run was too short for the
        4-per-second samples to see both (a tiny smoke run, stored in one or two batches)."""
        low = next((s for s in self.samples if s[1] >= 0.1 * total), None)
        high = [s for s in self.samples if s[1] <= 0.9 * total]
        if low is None or not high or high[-1][0] <= low[0] or high[-1][1] <= low[1]:
            return float("nan")  # too few images to see a steady rate
        return (high[-1][1] - low[1]) / (high[-1][0] - low[0])


def run_engine(name: str, items, embedder, batch_size: int) -> dict:
    sessions = fresh_database(f"imsrc_bench_ingest_{name}")
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    with StoredCounter(sessions) as counter:
        started = time.perf_counter()
        if name == "ray":
            from backend.pipeline.ray_ingest import ingest_on_ray

            report = ingest_on_ray(sessions, items, embedder, url, batch_size=batch_size, progress=False)
        else:
            report = ingest(sessions, items, embedder, batch_size=batch_size, progress=False)
        wall = time.perf_counter() - started
    assert report.added == len(items), report.summary()
    sessions.kw["bind"].dispose()
    return {"engine": name, "images": len(items), "wall_s": round(wall, 2),
            "wall_images_per_s": round(len(items) / wall, 1), "steady_images_per_s": _measured(counter.steady_rate(len(items)))}


def write_ceiling(items, dim: int, batch_size: int) -> dict:
    """The store path alone: images with random unit vectors, batch by batch, one transaction each."""
    sessions = fresh_database("imsrc_bench_ingest_write")
    rng = np.random.default_rng(0)
    batches = []
    for i in range(0, len(items), batch_size):  # decoded before the clock runs: only the writes are timed
        ready = Prepared()
        for item in items[i:i + batch_size]:
            data = item.read()
            picture = decode(data)
            ready.to_embed.append(sha256(data))
            ready.new_images.append(NewImage(sha256=ready.to_embed[-1], data=data, width=picture.width,
                                             height=picture.height, format=picture.format, category=item.category,
                                             label=item.label, original_name=item.original_name, source_dataset=item.source))
        vectors = rng.standard_normal((len(ready.to_embed), dim)).astype(np.float32)
        batches.append((ready, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))
    report = IngestReport()
    started = time.perf_counter()
    for ready, vectors in batches:
        store_batch(sessions, ready, vectors, "bench-random", report)
    seconds = time.perf_counter() - started
    sessions.kw["bind"].dispose()
    return {"engine": "store path only", "images": report.added, "wall_s": round(seconds, 2),
            "wall_images_per_s": round(report.added / seconds, 1), "steady_images_per_s": None}


def _measured(rate: float) -> float | None:
    return round(rate, 1) if math.isfinite(rate) else None  # nan: too few images to see a steady rate


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either was not measured."""
    return round(a / b, 2) if a is not None and b else None


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "(not measured)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=settings.batch_size)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    items = select_balanced(load_dataset("fashion-mnist", "train", settings.fashion_mnist_dir), args.images)
    embedder = get_embedder(args.model).load()
    from backend.pipeline.ray_ingest import connect

    connect(None)  # a local cluster of this machine's cores, started before any clock runs
    import ray

    rows = [run_engine("single", items, embedder, args.batch_size), run_engine("ray", items, embedder, args.batch_size),
            write_ceiling(items, embedder.dim, args.batch_size)]
    ray.shutdown()
    single, on_ray = rows[0], rows[1]
    ratios = {kind: _ratio(on_ray[f"{kind}_images_per_s"], single[f"{kind}_images_per_s"]) for kind in ("wall", "steady")}
    info = machine()
    print(f"{info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; {args.model} "
          f"{embedder.precision}/{embedder.runtime_in_use}, batch {args.batch_size}, {len(items)} Fashion-MNIST images")
    print(f"{'engine':<18}{'wall s':>9}{'images/s (wall)':>17}{'images/s (steady)':>19}")
    for r in rows:
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] is not None else "-"
        print(f"{r['engine']:<18}{r['wall_s']:>9.1f}{r['wall_images_per_s']:>17.1f}{steady:>19}")
    per_core = (single["steady_images_per_s"] or single["wall_images_per_s"]) / info["cores"]
    print(f"Ray / single: {_times(ratios['wall'])} wall, {_times(ratios['steady'])} steady; "
          f"{per_core:.1f} images/s per core embedding here; one writer stores up to {rows[2]['wall_images_per_s']:.0f}/s")
    write_json(args.json,
               {"machine": info, "model": args.model, "precision": embedder.precision,
                "runtime": embedder.runtime_in_use, "batch_size": args.batch_size, "rows": rows, "ratios": ratios,
                "per_core_images_per_s": round(per_core, 1)})


if __name__ == "__main__":
    sys.exit(main())
