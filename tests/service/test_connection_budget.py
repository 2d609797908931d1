"""A server's PostgreSQL connections stay within its budget (DB_POOL_SIZE + DB_POOL_OVERFLOW + its listener) however
many collections anonymous clients name, while keyed uploads and other imsrc commands go on working."""
import itertools
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.storage.collections import create_collection
from tests.helpers import ROOT, png_bytes, running_server

pytestmark = [pytest.mark.slow, pytest.mark.minutes]

KEY = "budget-test-key"
COLLECTIONS = 200
SECONDS = 60.0  # as long as the flood ran
POOL, OVERFLOW = 3, 2
BUDGET = POOL + OVERFLOW + 1  # the pool, its overflow and the one listener


def _connections(engine, pid: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name IN (:a, :b)"),
                           {"a": f"imsrc {pid}", "b": f"imsrc-listener {pid}"})


def test_anonymous_reads_of_200_collections_stay_within_the_connection_budget(cli_env, engine, tmp_path):
    for n in range(COLLECTIONS):
        create_collection(engine, f"flood{n:03d}")
    env = {**cli_env, "API_KEY": KEY, "DB_POOL_SIZE": str(POOL), "DB_POOL_OVERFLOW": str(OVERFLOW),
           "SERVED_COLLECTIONS_MAX": "8"}
    stop, failures, reads, uploads, peak = threading.Event(), [], [0], [0], [0]

    def read(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for n in itertools.count(offset, 7):
                if stop.is_set():
                    return
                response = client.get(f"/categories?collection=flood{n % COLLECTIONS:03d}")
                reads[0] += 1
                if response.status_code != 200:
                    failures.append(f"read {response.status_code}: {response.text[:200]}")

    def upload() -> None:
        with httpx.Client(base_url=base, timeout=30, headers={"X-API-Key": KEY}) as client:
            for n in itertools.count():
                if stop.wait(0.3):
                    return
                picture = png_bytes(Image.new("RGB", (16, 16), (n % 256, (n // 256) % 256, 7)))
                response = client.post("/upload", files={"file": ("u.png", picture)}, data={"category": "u"})
                uploads[0] += 1
                if response.status_code != 200:
                    failures.append(f"upload {response.status_code}: {response.text[:200]}")

    def watch(pid: int) -> None:
        while not stop.wait(0.5):
            peak[0] = max(peak[0], _connections(engine, pid))

    with running_server(env, tmp_path / "serve.log") as (base, proc):
        threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=upload), threading.Thread(target=watch, args=(proc.pid,))]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        status = subprocess.run([sys.executable, "-m", "backend", "status"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)  # another imsrc command on the same database, meanwhile
        stop.wait(max(0.0, SECONDS - (time.monotonic() - started)))
        stop.set()
        for thread in threads:
            thread.join(60)
    log = (tmp_path / "serve.log").read_text()
    assert status.returncode == 0, status.stdout + status.stderr
    assert not failures, failures[:5]
    assert "too many clients" not in log
    assert reads[0] > COLLECTIONS and uploads[0] > 50  # every collection named, most more than once
    assert 0 < peak[0] <= BUDGET, f"{peak[0]} connections at the peak, budget {BUDGET}"
