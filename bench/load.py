"""HTTP load on loopback against a real `python -m backend serve`: the first search after start-up, then
POST /search at several concurrencies, with the server's memory. Bounded in requests and time; loopback only.

Usage: python bench/load.py [--images 2000] [--concurrency 1 4 16 64] [--requests 64] [--workers 1]
                            [--baseline REV] [--json FILE]

It populates a throw-away DATA_DIR with Fashion-MNIST train images (MODEL_NAME as configured, default the
offline choice), starts the server on a free loopback port, and queries with held-out Fashion-MNIST test images.
"""
import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pipeline.datasets import load_dataset, select_balanced  # noqa: E402
from bench.common import (checkout, free_port, machine, percentile, tree_cpu_seconds, tree_rss_mib, wait_ready,
                          write_json)  # noqa: E402


BOUNDARY = "imsrc-load-boundary"


class Searcher:
    """POST /search with each query as a multipart upload encoded once, over one keep-alive connection per thread:
    the load client runs on the server's two cores, and httpx building each request took 1.0-1.2 ms of CPU a search
    there, which the server's figures then paid for."""

    def __init__(self, base: str, queries: list[bytes]):
        self.host, self.port = base.removeprefix("http://").split(":")
        self.bodies = [(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
                        f"Content-Type: image/png\r\n\r\n").encode() + query + f"\r\n--{BOUNDARY}--\r\n".encode()
                       for query in queries]
        self.local = threading.local()

    def __call__(self, k: int) -> tuple[int, float]:
        """(status, ms) of searching with query k (modulo the number of queries)."""
        started = time.perf_counter()
        for attempt in (1, 2):  # a connection the server closed (after a 503, say) is opened again once
            if getattr(self.local, "connection", None) is None:
                self.local.connection = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
            try:
                self.local.connection.request("POST", "/search", self.bodies[k % len(self.bodies)], {
                    "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                response = self.local.connection.getresponse()
                response.read()
                return response.status, (time.perf_counter() - started) * 1000
            except (http.client.HTTPException, ConnectionError):
                self.local.connection.close()
                self.local.connection = None
                if attempt == 2:
                    raise


def level(base: str, queries: list[bytes], concurrency: int, total: int, pid: int) -> dict:
    """`total` searches by `concurrency` clients at once."""
    before, server_cpu, client_cpu = tree_rss_mib(pid), tree_cpu_seconds(pid), time.process_time()
    search = Searcher(base, queries)
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(search, range(total)))
        seconds = time.perf_counter() - started
    # CPU per search: on a machine the client shares, what the server saves is what the others get
    server_cpu, client_cpu = tree_cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
    ok = [ms for code, ms in results if code == 200]
    return {"concurrency": concurrency, "requests": total, "req_per_s": round(len(ok) / seconds, 1),
            "p50_ms": round(percentile(ok, 0.5), 1) if ok else None,
            "p95_ms": round(percentile(ok, 0.95), 1) if ok else None,
            "p99_ms": round(percentile(ok, 0.99), 1) if ok else None,
            "busy_503": sum(code == 503 for code, _ in results),
            "errors": sum(code not in (200, 503) for code, _ in results),
            "server_cpu_ms_per_request": round(server_cpu / total * 1000, 2),
            "client_cpu_ms_per_request": round(client_cpu / total * 1000, 2),
            "rss_before_mib": round(before), "rss_after_mib": round(tree_rss_mib(pid))}


def model_only_one_image_ms(model: str, query: bytes) -> float:
    """Median ms of the model alone on one preprocessed query image, as the server runs it (imported here: the rest
    of the benchmark is a client and needs no model)."""
    from backend.embedding.decode import decode
    from backend.embedding.models import get_embedder

    embedder = get_embedder(model).load()
    batch = embedder.prepare([decode(query).image])
    times = []
    for _ in range(25):
        started = time.perf_counter()
        embedder.embed_prepared(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[5:])


def serve_and_load(root: Path, env: dict, queries: list[bytes], args) -> dict:
    """Start `python -m backend serve` from the checkout at `root`, then the first search and every level."""
    base = f"http://127.0.0.1:{env['API_PORT']}"
    server = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--workers", str(args.workers)], cwd=root,
                              env={**env, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, server)
        idle = tree_rss_mib(server.pid)
        model = httpx.get(base + "/status", timeout=60).json()["model"]
        search = Searcher(base, queries)
        _, first = search(0)
        warm = [search(i)[1] for i in range(1, 21)]
        rows = [level(base, queries, c, max(args.requests, 4 * c), server.pid) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(60)
    return {"model": model, "idle_rss_mib": round(idle), "first_search_ms": round(first, 1),
            "warm_search_p50_ms": round(statistics.median(warm), 1), "levels": rows}


def print_table(title: str, run: dict, model_ms: float) -> None:
    print(f"{title}: first search after /health 200: {run['first_search_ms']} ms; warm p50 "
          f"{run['warm_search_p50_ms']} ms ({run['first_search_ms'] / run['warm_search_p50_ms']:.2f}x); idle server "
          f"RSS {run['idle_rss_mib']} MiB")
    print(f"{'conc':>5}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'503':>6}{'errors':>7}{'RSS MiB':>14}"
          f"{'CPU ms/req server client':>26}")
    for r in run["levels"]:
        print(f"{r['concurrency']:>5}{r['req_per_s']:>8}{r['p50_ms']!s:>9}{r['p95_ms']!s:>9}{r['p99_ms']!s:>9}"
              f"{r['busy_503']:>6}{r['errors']:>7}{r['rss_before_mib']:>7}->{r['rss_after_mib']:<6}"
              f"{r.get('server_cpu_ms_per_request', '')!s:>13}{r.get('client_cpu_ms_per_request', '')!s:>7}")
    one = next((r for r in run["levels"] if r["concurrency"] == 1), None)
    many = next((r for r in run["levels"] if r["concurrency"] == 16), None)
    if one and one["p50_ms"]:
        print(f"concurrency 1: p50 {one['p50_ms']} ms = {one['p50_ms'] / model_ms:.2f}x the model alone on one image "
              f"({model_ms:.1f} ms)" + (f"; concurrency 16: {many['req_per_s'] / one['req_per_s']:.2f}x the "
                                        f"throughput of 1" if many else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Fashion-MNIST train images to index")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="searches per concurrency level (at least 4x it)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (serve --workers)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also serve the same data from this git revision first, as the 'before' table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    queries = [item.read() for item in select_balanced(load_dataset("fashion-mnist", "test"), 50)]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="imsrc-load-") as data_dir:
        # The defaults, whatever a local .env says; only the data folder and port are the benchmark's own.
        env = {**os.environ, "IMSRC_ENV_FILE": os.devnull, "DATA_DIR": data_dir, "API_PORT": str(free_port()),
               "PYTHONUNBUFFERED": "1"}
        subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist",
                        "--num-images", str(args.images)], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, revision in ([("before", args.baseline)] if args.baseline else []) + [("now", None)]:
            with checkout(revision) as root:
                runs[name] = serve_and_load(root, env, queries, args)
    model_ms = model_only_one_image_ms(runs["now"]["model"], queries[0])
    report = {"machine": machine(), "indexed_images": args.images, "workers": args.workers,
              "model_only_one_image_ms": round(model_ms, 1), "baseline": args.baseline, **runs["now"]}
    if args.baseline:
        report["before"] = runs["before"]
    info = report["machine"]
    print(f"{info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; {args.images} images indexed; "
          f"{args.workers} server worker(s)")
    if args.baseline:
        print_table(f"before ({args.baseline})", runs["before"], model_ms)
    print_table("now", runs["now"], model_ms)
    write_json(args.json, report)


if __name__ == "__main__":
    main()
