"""Changing the model of a served collection: how long a re-embed takes while the server answers searches, what the
searches pay meanwhile, and how long the switch (and the switch back) takes to reach the server.

Usage: python bench/reembed.py [--images 2000] [--from efficientnet_lite0] [--to efficientnet_lite2]
                             [--phase-seconds 20] [--json FILE]

On a fresh throw-away database on the configured PostgreSQL: `populate` the offline demo's collection (Fashion-MNIST,
--images of them, as `./setup.sh demo` does offline), start `python -m backend serve`, and search it one query at a
time from this process throughout. Phases: idle (20 s of searches, the baseline), re-embed (`python -m backend
reembed --model TO` in another process), switch (`switch-model TO` until /status shows it), switch back. Prints
search latency per phase as a ratio to idle, errors, the re-embed's time and the switches'; --json writes them all.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pipeline.datasets import load_dataset, select_balanced  # noqa: E402
from bench.common import drop_database, free_port, fresh_database, machine, percentile, wait_ready, write_json  # noqa: E402,E501

DATABASE = "imsrc_bench_reembed"


class Searcher(threading.Thread):
    """Searches the server one query after another, recording (phase, seconds, status) of each."""

    def __init__(self, base: str, queries: list[bytes]):
        super().__init__(daemon=True)
        self.base, self.queries, self.phase = base, queries, "idle"
        self.records: list[tuple[str, float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                started = time.perf_counter()
                r = client.post("/search?limit=10", files={"file": ("q.png", self.queries[n % len(self.queries)],
                                                                    "image/png")})
                self.records.append((self.phase, time.perf_counter() - started, r.status_code))
                n += 1


def wait_model(client: httpx.Client, model: str, timeout: float = 600) -> float:
    """Seconds until the server's /status names `model`."""
    started = time.perf_counter()
    while client.get("/status").json()["model"] != model:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"the server never switched to {model}")
        time.sleep(0.05)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--from", dest="source", default="efficientnet_lite0")
    parser.add_argument("--to", dest="target", default="efficientnet_lite2")
    parser.add_argument("--phase-seconds", type=float, default=20,
                        help="searches before the re-embed (the baseline); half as long after each switch")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sessions = fresh_database(DATABASE)
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    sessions.kw["bind"].dispose()
    queries = [item.read() for item in select_balanced(load_dataset("fashion-mnist", "test"), 20)]
    report = {"machine": machine(), "images": args.images, "from": args.source, "to": args.target}
    with tempfile.TemporaryDirectory(prefix="imsrc-reembed-") as data_dir:
        env = {**os.environ, "IMSRC_ENV_FILE": os.devnull, "DATA_DIR": data_dir, "API_PORT": str(free_port()),
               "DATABASE_URL": url, "MODEL_NAME": args.source, "PYTHONUNBUFFERED": "1"}

        def cli(*command: str) -> float:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "backend", *command], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return time.perf_counter() - started

        report["populate_s"] = round(cli("populate", "--dataset", "fashion-mnist", "--num-images", str(args.images)), 1)
        base = f"http://127.0.0.1:{env['API_PORT']}"
        server = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        searcher = Searcher(base, queries)
        try:
            wait_ready(base, server)
            client = httpx.Client(base_url=base, timeout=60)
            searcher.start()
            time.sleep(args.phase_seconds)
            searcher.phase = "re-embed"
            report["reembed_s"] = round(cli("reembed", "--model", args.target), 1)

            def switch(model: str, during: str, after: str, settle: float) -> float:
                """Switch to `model` and return the seconds until the server searches with it; then search on."""
                searcher.phase = during
                started = time.perf_counter()
                cli("switch-model", model)
                wait_model(client, model)
                took = round(time.perf_counter() - started, 2)
                searcher.phase = after
                time.sleep(settle)
                return took

            report["switch_s"] = switch(args.target, "switch", "new model", args.phase_seconds / 2)
            report["switch_back_s"] = switch(args.source, "switch back", "old model again", args.phase_seconds / 4)
        finally:
            searcher.stop.set()
            searcher.join(60)
            server.terminate()
            server.wait(60)
    drop_database(DATABASE)
    idle = percentile([s for p, s, _ in searcher.records if p == "idle"], 0.5)
    phases = []
    for phase in dict.fromkeys(p for p, _, _ in searcher.records):
        took = [s for p, s, _ in searcher.records if p == phase]
        phases.append({"phase": phase, "searches": len(took),
                       "errors": sum(1 for p, _, status in searcher.records if p == phase and status != 200),
                       "p50_ms": round(percentile(took, 0.5) * 1000, 1), "p95_ms": round(percentile(took, 0.95) * 1000, 1),
                       "p50_vs_idle": round(percentile(took, 0.5) / idle, 2)})
    report["phases"] = phases
    print(f"{report['machine']['cpu']} ({', '.join(report['machine']['flags'])}), {report['machine']['cores']} cores")
    print(f"populate {args.images} images with {args.source}: {report['populate_s']} s; re-embed with {args.target} "
          f"while serving: {report['reembed_s']} s; switch: {report['switch_s']} s; back: {report['switch_back_s']} s")
    print(f"{'phase':<16}{'searches':>9}{'errors':>7}{'p50 ms':>9}{'p95 ms':>9}{'p50/idle':>9}")
    for row in phases:
        print(f"{row['phase']:<16}{row['searches']:>9}{row['errors']:>7}{row['p50_ms']:>9}{row['p95_ms']:>9}"
              f"{row['p50_vs_idle']:>9}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
