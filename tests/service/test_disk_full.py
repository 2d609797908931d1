"""A database whose disk is full is said as it is (507 naming the disk), while searches go on working."""
import os
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.soak import fill
from tests.helpers import png_bytes, running_server

pytestmark = pytest.mark.slow

KEY = "disk-test-key"
DISK_MB = 192  # room for a new cluster (~40 MB), its WAL and a few uploads


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of DISK_MB mounted for the test; skipped where this process cannot mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    os.chmod(disk, 0o755)  # the embedded server's own user must reach its data folder in it
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _noise(seed: int) -> bytes:
    """A PNG that does not compress: each upload needs new pages."""
    return png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (192, 192, 3), np.uint8)))


def test_a_full_disk_gets_507_naming_it_while_searches_and_deletes_go_on(cli_env, small_disk, tmp_path):
    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}  # the embedded server, on the small disk
    env.update(API_KEY=KEY, DATA_DIR=str(small_disk / "data"))
    with running_server(env, tmp_path / "serve.log") as (base, _), \
            httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": KEY}) as client:
        stored = [client.post("/upload", files={"file": ("a.png", _noise(n))}, data={"category": "a"})
                  for n in range(6)]
        assert [r.status_code for r in stored] == [200] * 6
        ids = [r.json()["image_id"] for r in stored]
        fill(small_disk / "filler")
        answers = []
        for n in range(100, 140):  # pages left in the tables' files take a few more; then the disk says no
            answers.append(client.post("/upload", files={"file": ("b.png", _noise(n))}, data={"category": "a"}))
            if answers[-1].status_code != 200:
                break
        full = answers[-1]
        assert full.status_code == 507, full.text
        assert "disk is full" in full.json()["detail"] and "free space" in full.json()["detail"]
        assert "Retry-After" in full.headers
        found = client.post("/search", files={"file": ("q.png", _noise(0))}, params={"limit": 3})
        assert found.status_code == 200 and found.json()["results"][0]["image_id"] == ids[0]
        gone = client.delete(f"/images/{ids[1]}")
        assert gone.status_code in (204, 507), gone.text  # PostgreSQL may still write a delete's few bytes
        (small_disk / "filler").unlink()
        again = client.post("/upload", files={"file": ("c.png", _noise(999))}, data={"category": "a"})
        assert again.status_code == 200, again.text
        assert client.get(f"/images/{ids[0]}/info").status_code == 200
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]
