"""Live sync lag: how long after another process commits a change a running server searches with it.

Usage: python bench/sync.py [--repeats 30] [--json FILE]

A real server (`python -m backend serve`, efficientnet_lite0, the defaults) runs on a fresh throw-away database on
the configured PostgreSQL (the embedded one, or DATABASE_URL's server). This process writes to that database as
`populate` or another server would (the store path, with made-up vectors of the model's size, so that no model
runs here) and after each commit polls the server's /status until the change shows. Per kind of write (one image,
a batch of 16, a batch of 256, deleting one image), --repeats times:
- seen: from our commit returning to /status showing the change (includes the HTTP round trips that poll);
- server lag: what the server itself reports (`sync.lag_ms`: the change's commit, by the database's clock, to the
  change applied to its index).
Prints p50/p95/max per kind; --json writes every figure.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.embedding.decode import sha256  # noqa: E402
from backend.embedding.models import model_dim  # noqa: E402
from backend.pipeline.ingest import IngestReport, Prepared, store_batch  # noqa: E402
from backend.storage import images as image_store  # noqa: E402
from backend.storage.images import NewImage  # noqa: E402
from bench.common import free_port, fresh_database, machine, percentile, wait_ready, write_json  # noqa: E402

MODEL = "efficientnet_lite0"
KINDS = {"add 1": 1, "add 16": 16, "add 256": 256, "delete 1": -1}


def new_batch(n: int, rng, dim: int) -> tuple[Prepared, np.ndarray]:
    """n never-seen images (distinct made-up bytes; never decoded) with random unit vectors."""
    ready = Prepared()
    for _ in range(n):
        data = rng.bytes(64)
        ready.new_images.append(NewImage(sha256=sha256(data), data=data, width=1, height=1, format="PNG",
                                         category=f"c{rng.integers(10)}", original_name="bench"))
        ready.to_embed.append(ready.new_images[-1].sha256)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return ready, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def wait_for(client: httpx.Client, size: int, applied: int, timeout: float = 30) -> dict:
    """Poll /status until the index holds `size` vectors and more than `applied` changes were applied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/status").json()
        if status["index_size"] == size and status["sync"]["changes_applied"] > applied:
            return status
    raise SystemExit(f"the server never showed the change (index {status['index_size']}, want {size})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sessions = fresh_database("imsrc_bench_sync")
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    rng, dim = np.random.default_rng(0), model_dim(MODEL)
    ready, vectors = new_batch(100, rng, dim)  # something to serve from the start
    store_batch(sessions, ready, vectors, MODEL, IngestReport())
    with tempfile.TemporaryDirectory(prefix="imsrc-sync-") as data_dir:
        env = {**os.environ, "IMSRC_ENV_FILE": os.devnull, "DATA_DIR": data_dir, "API_PORT": str(free_port()),
               "DATABASE_URL": url, "MODEL_NAME": MODEL, "PYTHONUNBUFFERED": "1"}
        base = f"http://127.0.0.1:{env['API_PORT']}"
        server = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = []
        try:
            wait_ready(base, server)
            with httpx.Client(base_url=base, timeout=30) as client:
                status = wait_for(client, 100, -1)
                for kind, n in KINDS.items():
                    seen, lags = [], []
                    for _ in range(args.repeats):
                        size, applied = status["index_size"], status["sync"]["changes_applied"]
                        if n > 0:
                            ready, vectors = new_batch(n, rng, dim)
                            store_batch(sessions, ready, vectors, MODEL, IngestReport())
                        else:
                            with sessions() as s, s.begin():
                                victim = s.scalar(sa.text("SELECT min(image_id) FROM embeddings"))
                                image_store.delete_images(s, [victim])
                        committed = time.perf_counter()
                        status = wait_for(client, size + (n if n > 0 else -1), applied)
                        seen.append((time.perf_counter() - committed) * 1000)
                        lags.append(status["sync"]["lag_ms"])
                    rows.append({"write": kind, "repeats": args.repeats,
                                 **{f"seen_{q}_ms": round(percentile(seen, p), 1) for q, p in (("p50", .5), ("p95", .95))},
                                 "seen_max_ms": round(max(seen), 1),
                                 **{f"lag_{q}_ms": round(percentile(lags, p), 1) for q, p in (("p50", .5), ("p95", .95))},
                                 "lag_max_ms": round(max(lags), 1)})
        finally:
            server.terminate()
            server.wait(60)
    info = machine()
    print(f"{info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; server: {MODEL}, flatip")
    print(f"{'write':<10}{'seen p50':>10}{'p95':>8}{'max':>8}{'lag p50':>10}{'p95':>8}{'max':>8}   (ms)")
    for r in rows:
        print(f"{r['write']:<10}{r['seen_p50_ms']:>10.1f}{r['seen_p95_ms']:>8.1f}{r['seen_max_ms']:>8.1f}"
              f"{r['lag_p50_ms']:>10.1f}{r['lag_p95_ms']:>8.1f}{r['lag_max_ms']:>8.1f}")
    write_json(args.json, {"machine": info, "model": MODEL, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
