"""A fault soak: a real `serve --workers 2` under mixed load while PostgreSQL is killed and frozen, a worker is
killed and the database's disk fills up; prints requests, unexpected 5xx, each fault's recovery, acknowledged writes
lost and `check` at the end.

Usage: python bench/soak.py [--minutes 20] [--fault-every 120] [--stop-seconds 20] [--full-seconds 30]
                            [--images 300] [--json FILE]

Load: 8 clients searching, 2 uploading new images, one deleting what they uploaded, one creating a collection,
uploading to it, searching it and deleting it, and a `reembed` with another model run again whenever it ends.
Faults, in turn, one every --fault-every seconds: kill -9 of the embedded PostgreSQL's postmaster, kill -9 of one
worker, SIGSTOP of every PostgreSQL process for --stop-seconds, the data folder's disk (a tmpfs, where this user
may mount one; else that fault is skipped) filled to the last byte for --full-seconds.
Expected during a fault: 503 with Retry-After (database unreachable, busy) and 507 with Retry-After (disk full);
every other 5xx is counted as unexpected. A dropped connection (the killed worker's requests) is counted apart.
A fault's recovery runs from its end (the kill, SIGCONT, the space freed) until /health, a search and an upload
all answer 200 again. Lost writes: uploads answered 200 (and not deleted with a 204) that are not there at the end.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, machine, wait_ready, write_json  # noqa: E402

KEY = "soak-key"
DISK_MB = 4096  # the tmpfs: room for the run's uploads and WAL; filled on purpose by the disk fault
OTHER_MODEL = "efficientnet_lite2"  # what the background re-embed computes (offline weights, like the default's)


def png(seed: int, size: int = 48) -> bytes:
    """A PNG of noise: each one new bytes, so that each upload stores an image."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class Tally:
    """What the clients saw, from every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.by_route: dict[str, Counter] = {}  # "POST /upload" -> statuses
        self.unexpected: list[str] = []
        self.dropped = 0
        self.acknowledged: set[int] = set()
        self.deleted: set[int] = set()
        self.reembeds: Counter = Counter()

    def call(self, client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response | None:
        """One request; its answer counted (None: the connection dropped)."""
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError:
            with self.lock:
                self.dropped += 1
            return None
        expected = response.status_code < 500 or (response.status_code in (503, 507)
                                                   and "Retry-After" in response.headers)
        route = f"{method} {'/'.join(url.split('/')[:2])}"  # /images/7 and /collections/x by their kind
        with self.lock:
            self.statuses[response.status_code] += 1
            self.by_route.setdefault(route, Counter())[response.status_code] += 1
            if not expected:
                self.unexpected.append(f"{method} {url}: {response.status_code} {response.text[:160]}")
        return response


class Load:
    """The clients, each a thread, until stop()."""

    def __init__(self, base: str, env: dict, queries: list[bytes], tally: Tally):
        self.base, self.env, self.queries, self.tally = base, env, queries, tally
        self.stopping = threading.Event()
        self.seeds = iter(range(10**6, 10**9))  # next() on a range iterator is atomic under the GIL
        loops = [self.search] * 8 + [self.upload] * 2 + [self.delete, self.churn_collections, self.reembed]
        self.threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i, loop in enumerate(loops)]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=90, headers={"X-API-Key": KEY})

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def search(self, i: int) -> None:
        with self.client() as client:
            while not self.stopping.is_set():
                query = self.queries[next(self.seeds) % len(self.queries)]
                self.tally.call(client, "POST", "/search", files={"file": ("q.png", query)}, params={"limit": 5})

    def upload(self, i: int) -> None:
        with self.client() as client:
            while not self.stopping.is_set():
                r = self.tally.call(client, "POST", "/upload", files={"file": ("u.png", png(next(self.seeds)))},
                                    data={"category": "soak"})
                if r is not None and r.status_code == 200 and not r.json()["duplicate"]:
                    with self.tally.lock:
                        self.tally.acknowledged.add(r.json()["image_id"])
                elif r is None or r.status_code >= 500:
                    self.stopping.wait(0.5)  # as a client told to retry after a while would

    def delete(self, i: int) -> None:
        with self.client() as client:
            while not self.stopping.wait(1.0):
                with self.tally.lock:
                    left = sorted(self.tally.acknowledged - self.tally.deleted)
                if len(left) < 10:
                    continue
                victim = left[next(self.seeds) % len(left)]
                r = self.tally.call(client, "DELETE", f"/images/{victim}")
                if r is not None and r.status_code in (204, 404):
                    with self.tally.lock:
                        self.tally.deleted.add(victim)
                elif r is None or r.status_code >= 500:  # the delete may or may not have committed
                    with self.tally.lock:
                        self.tally.acknowledged.discard(victim)

    def churn_collections(self, i: int) -> None:
        with self.client() as client:
            for n in range(10**6):
                if self.stopping.wait(3.0):
                    return
                name = f"soak{n}"
                if self.tally.call(client, "POST", "/collections", json={"name": name}) is None:
                    continue
                self.tally.call(client, "POST", "/upload", params={"collection": name},
                                files={"file": ("c.png", png(next(self.seeds)))}, data={"category": "c"})
                self.tally.call(client, "POST", "/search", params={"collection": name},
                                files={"file": ("q.png", self.queries[0])})
                self.tally.call(client, "DELETE", f"/collections/{name}", params={"confirm": name})

    def reembed(self, i: int) -> None:
        while not self.stopping.wait(10.0):
            proc = subprocess.Popen([sys.executable, "-m", "backend", "reembed", "--model", OTHER_MODEL], cwd=ROOT,
                                    env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None:
                if self.stopping.wait(1.0):
                    proc.terminate()
                    proc.wait(60)
                    return
            # exit 1: it went through, and images uploaded meanwhile still lack the other model's vectors
            outcome = {0: "complete", 1: "new images meanwhile"}.get(proc.returncode, f"exit {proc.returncode}")
            with self.tally.lock:
                self.tally.reembeds[outcome] += 1


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def kill_postgres(ctx: dict) -> None:
    os.kill(_postmaster(ctx["pgdata"]), signal.SIGKILL)


def kill_worker(ctx: dict) -> None:
    workers = [p for p in _children(ctx["server"].pid)
               if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(workers[0], signal.SIGKILL)


def freeze_postgres(ctx: dict) -> None:
    postmaster = _postmaster(ctx["pgdata"])
    frozen = [postmaster, *_children(postmaster)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(ctx["stop_seconds"])
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)


def fill(path: Path) -> None:
    """Write `path` until its disk has no byte left (unbuffered: nothing is left to fail at close)."""
    with open(path, "wb", buffering=0) as f:
        for size in (2**20, 4096, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass


def fill_disk(ctx: dict) -> None:
    fill(ctx["disk"] / "filler")
    time.sleep(ctx["full_seconds"])
    (ctx["disk"] / "filler").unlink()


FAULTS = [("kill -9 PostgreSQL", kill_postgres), ("kill -9 a worker", kill_worker),
          ("SIGSTOP PostgreSQL", freeze_postgres), ("disk full", fill_disk)]


def free_mib(disk: Path | None) -> float | None:
    """Space left on the tmpfs (None without one): a failure's report says whether the disk was still full."""
    if disk is None:
        return None
    stat = os.statvfs(disk)
    return round(stat.f_bavail * stat.f_frsize / 2**20, 1)


def recovery(base: str, queries: list[bytes], since: float, disk: Path | None,
             limit: float = 120) -> tuple[float | None, str]:
    """Seconds from `since` until /health, a search and an upload all answer 200 (None: not within `limit`), and
    what the last probe that did not answer 200 got, with the disk's free space (for the report when it never
    recovered)."""
    last = ""
    with httpx.Client(base_url=base, timeout=10, headers={"X-API-Key": KEY}) as client:
        while time.monotonic() - since < limit:
            try:
                for name, probe in (("GET /health", lambda: client.get("/health")),
                                    ("POST /search", lambda: client.post("/search", files={"file": ("q.png",
                                                                                                     queries[0])})),
                                    ("POST /upload", lambda: client.post(
                                        "/upload", files={"file": ("p.png", png(int(time.time() * 1e6)))},
                                        data={"category": "probe"}))):
                    answer = probe()
                    if answer.status_code != 200:
                        last = f"{name}: {answer.status_code} {answer.text[:200]} ({free_mib(disk)} MiB free)"
                        break
                else:
                    return round(time.monotonic() - since, 2), ""
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc} ({free_mib(disk)} MiB free)"
            time.sleep(0.1)
    return None, last


def distinct_tail(lines, count: int) -> list[str]:
    """The last `count` distinct log lines, each without its prefix up to "] " (time, process): a failure's
    report, where one message repeats for every request."""
    return list(dict.fromkeys(line.split("] ", 1)[-1][:300] for line in lines))[-count:]


def postgres_log(pgdata: Path) -> list[str]:
    """The embedded server's log, as distinct_tail, for the report of a fault that never recovered."""
    try:
        text = (pgdata / "server.log").read_text(errors="replace")
    except OSError as exc:
        return [f"cannot read the PostgreSQL log: {exc}"]
    return distinct_tail(text.splitlines(), 30)


def inject(ctx: dict, args, queries: list[bytes]) -> list[dict]:
    """One fault every --fault-every seconds until --minutes have passed; each fault's recovery."""
    faults, started = [], time.monotonic()
    for n in range(max(1, int(args.minutes * 60 // args.fault_every))):
        time.sleep(max(0.0, started + (n + 1) * args.fault_every - time.monotonic()))
        name, fault = FAULTS[n % len(FAULTS)]
        at = round(time.monotonic() - started)
        if fault is fill_disk and ctx["disk"] is None:
            faults.append({"fault": name, "at_s": at, "recovery_s": None, "skipped": "cannot mount a tmpfs here"})
        else:
            fault(ctx)
            seconds, last = recovery(ctx["base"], queries, time.monotonic(), ctx["disk"])
            faults.append({"fault": name, "at_s": at, "recovery_s": seconds}
                          | ({"last_failure": last, "postgres_log": postgres_log(ctx["pgdata"])} if seconds is None
                             else {"last_failure": last} if last else {}))
        print(f"  {at:>5} s  {name:<20} recovered in {faults[-1]['recovery_s']} s {faults[-1].get('last_failure', '')}",
              flush=True)
    return faults


def mount_disk(folder: Path) -> Path | None:
    """A DISK_MB tmpfs at `folder`, or None where this user cannot mount one."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        return None
    folder.chmod(0o755)  # the embedded server's own user must reach its data in it
    return folder


def lost_writes(base: str, tally: Tally) -> int:
    """Uploads answered 200 and not deleted that the server no longer has."""
    with httpx.Client(base_url=base, timeout=30) as client:
        return sum(client.get(f"/images/{i}/info").status_code != 200
                   for i in sorted(tally.acknowledged - tally.deleted))


def soak(args, work: Path) -> dict:
    """Populate, serve, load, fault, then count."""
    from backend.pipeline.datasets import load_dataset, select_balanced

    disk = mount_disk(work / "disk")
    data = (disk or work) / "data"
    env = {**os.environ, "IMSRC_ENV_FILE": os.devnull, "DATA_DIR": str(data), "API_KEY": KEY,
           "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)  # the embedded server, whose process this benchmark can kill
    subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--num-images",
                    str(args.images)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    queries = [item.read() for item in select_balanced(load_dataset("fashion-mnist", "test"), 20)]
    base, log = f"http://127.0.0.1:{free_port()}", args.log or work / "serve.log"
    with open(log, "w") as out:  # the log beside the disk, not on it: it must outlive the disk fault
        server = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--workers", "2", "--port",
                                   base.rsplit(":", 1)[1]], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, server)
        tally, ctx = Tally(), {"pgdata": data / "postgres", "server": server, "disk": disk, "base": base,
                               "stop_seconds": args.stop_seconds, "full_seconds": args.full_seconds}
        load = Load(base, env, queries, tally)
        load.start()
        faults = inject(ctx, args, queries)
        load.stop()
        lost = lost_writes(base, tally)
    finally:
        server.terminate()
        server.wait(120)
    check = subprocess.run([sys.executable, "-m", "backend", "check"], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    if disk is not None:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    return {"machine": machine(), "minutes": args.minutes, "images": args.images, "faults": faults,
            "requests": sum(tally.statuses.values()), "statuses": dict(sorted(tally.statuses.items())),
            "by_route": {route: dict(sorted(c.items())) for route, c in sorted(tally.by_route.items())},
            "unexpected_5xx": len(tally.unexpected), "unexpected_samples": tally.unexpected[:10],
            "dropped_connections": tally.dropped, "acknowledged_uploads": len(tally.acknowledged),
            "deleted": len(tally.deleted), "lost_writes": lost, "reembeds": dict(tally.reembeds),
            "check_exit": check.returncode, "check_last_line": (check.stdout.strip().splitlines() or [""])[-1],
            "server_tracebacks": log.read_text().count("Traceback")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--fault-every", type=float, default=120.0, help="seconds between faults")
    parser.add_argument("--stop-seconds", type=float, default=20.0, help="how long PostgreSQL stays SIGSTOPped")
    parser.add_argument("--full-seconds", type=float, default=30.0, help="how long the disk stays full")
    parser.add_argument("--images", type=int, default=300, help="Fashion-MNIST images populated first")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="keep the server's log in this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imsrc-soak-") as work:
        info = machine()
        print(f"{info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; serve --workers 2, "
              f"{args.minutes:g} min, a fault every {args.fault_every:g} s", flush=True)
        report = soak(args, Path(work))
    recoveries = [f["recovery_s"] for f in report["faults"] if "skipped" not in f]
    longest = max(recoveries, default=None) if None not in recoveries else "never"
    print(f"{'requests':<24}{report['requests']}  {report['statuses']}")
    for route, statuses in report["by_route"].items():
        print(f"  {route:<22}{statuses}")
    for label, key in (("unexpected 5xx", "unexpected_5xx"), ("dropped connections", "dropped_connections"),
                       ("acknowledged uploads", "acknowledged_uploads"), ("lost writes", "lost_writes"),
                       ("re-embeds", "reembeds"), ("check exit", "check_exit"),
                       ("server tracebacks", "server_tracebacks")):
        print(f"{label:<24}{report[key]}")
    print(f"{'longest recovery s':<24}{longest}")
    for sample in report["unexpected_samples"]:
        print(f"  unexpected: {sample}")
    write_json(args.json, {**report, "longest_recovery_s": longest})


if __name__ == "__main__":
    main()
