"""The hostile corpus (tests/hostile_files.py) against the real server and the real model, measuring the server's
peak memory per request, and through `populate --dataset folder`: no 5xx, every valid image works, every
invalid one gets a specific 4xx or a skipped-with-reason line."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from backend.pipeline.datasets import IMAGE_SUFFIXES
from tests.helpers import free_port, wait_healthy, write_fashion_mnist
from tests.hostile_files import corpus

ROOT = Path(__file__).resolve().parents[2]
KEY = "hostile-test-key"
RSS_BUDGET_MIB = 256
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hostile")]


def _kib(pid: int, field: str) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0])


def _peak_extra_mib(pid: int, send) -> tuple[httpx.Response, float]:
    """Send a request and return it with how far the server's peak RSS rose above its RSS before it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _kib(pid, "VmRSS")
    response = send()
    return response, (_kib(pid, "VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def files():
    return corpus()


@pytest.fixture(scope="module")
def server(new_cli_env, tmp_path_factory):
    """A real server with API_KEY on 30 Fashion-MNIST images, shared by the module's tests; yields (base, pid)."""
    cli_env, tmp_path = new_cli_env(), tmp_path_factory.mktemp("hostile-server")
    write_fashion_mnist(tmp_path / "fm", n_per_class=3)
    populate = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist",
                               "--data-dir", str(tmp_path / "fm")], cwd=ROOT, env=cli_env, capture_output=True,
                              text=True, timeout=300)
    assert populate.returncode == 0, populate.stderr
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", str(port)], cwd=ROOT,
                            env={**cli_env, "API_KEY": KEY}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    assert wait_healthy(base, 180, alive=lambda: proc.poll() is None), (tmp_path / "server.log").read_text()[-3000:]
    yield base, proc.pid
    proc.terminate()
    proc.wait(60)
    log.close()


def test_every_hostile_file_through_every_image_endpoint_with_bounded_memory(server, files, output_dir):
    base, pid = server
    endpoints = {"/search": {}, "/search/prototypes": {}, "/upload": {"category": "hostile"}}
    with httpx.Client(base_url=base, timeout=120, headers={"X-API-Key": KEY}) as client:
        ordinary = next(f for f in files if f.name == "progressive.jpg")
        for _ in range(3):  # warm up the allocator on ordinary requests before measuring
            client.post("/search", files={"file": (ordinary.name, ordinary.data, "image/jpeg")})
        report, worst = [], 0.0
        for f in files:
            for path, data in endpoints.items():
                response, extra = _peak_extra_mib(pid, lambda: client.post(
                    path, data=data, files={"file": (f.name, f.data, "application/octet-stream")}))
                worst = max(worst, extra)
                took = response.elapsed.total_seconds()
                report.append({"file": f.name, "endpoint": path, "status": response.status_code, "seconds": took,
                               "peak_extra_mib": round(extra, 1), "detail": response.json().get("detail")})
                assert response.status_code < 500, (f.name, path, response.text)
                if f.valid:
                    assert response.status_code == 200, (f.name, path, response.text)
                else:
                    assert response.status_code in (400, 413, 415, 422), (f.name, path, response.text)
                    assert response.json()["detail"], (f.name, path)
                    assert took < 1, (f.name, path, f"refused after {took:.2f} s")  # the work is bounded first
                assert extra <= RSS_BUDGET_MIB, (f.name, path, f"+{extra:.0f} MiB")
    (output_dir / "hostile-report.json").write_text(json.dumps(
        {"files": len(files), "valid": sum(f.valid for f in files), "requests": len(report),
         "worst_peak_extra_mib": round(worst, 1), "requests_detail": report}, indent=1))
    slowest = max(r["seconds"] for r, f in zip(report, (f for f in files for _ in endpoints)) if not f.valid)
    print(f"\n{len(files)} files x {len(endpoints)} endpoints = {len(report)} requests, 0 5xx, "
          f"worst peak RSS +{worst:.0f} MiB per request, slowest refusal {slowest:.2f} s")


def test_chunk_floods_in_flight_hold_up_no_ordinary_search(server, files):
    base = server[0]
    flood = next(f for f in files if f.name == "chunk-flood-700k.png")
    ordinary = next(f for f in files if f.name == "progressive.jpg")

    def search(data: bytes) -> tuple[int, float]:
        started = time.monotonic()
        response = httpx.post(base + "/search", files={"file": ("q", data, "application/octet-stream")}, timeout=60)
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(search, flood.data) for _ in range(4)]
        status, seconds = search(ordinary.data)
        answers = [f.result() for f in floods]
    assert status == 200 and seconds < 1, (status, seconds)
    assert all(code == 400 and took < 1 for code, took in answers), answers


def test_populate_folder_skips_each_invalid_file_with_its_reason(cli_env, files, tmp_path):
    folder = tmp_path / "corpus" / "hostile"
    folder.mkdir(parents=True)
    taken = [f for f in files if Path(f.name).suffix in IMAGE_SUFFIXES]  # what the folder loader reads
    for f in taken:
        (folder / f.name).write_bytes(f.data)
    proc = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "folder",
                           "--data-dir", str(tmp_path / "corpus")], cwd=ROOT, env=cli_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    valid, invalid = sum(f.valid for f in taken), sum(not f.valid for f in taken)
    assert f"added {valid}, 0 already stored, failed {invalid}" in proc.stdout, proc.stdout
    failures = [line for line in proc.stdout.splitlines() if line.startswith("  failed: ")]
    assert all(": " in line.removeprefix("  failed: ") for line in failures)
    shown = {line.removeprefix("  failed: ").split(": ")[0].removeprefix("hostile/") for line in failures}
    assert shown <= {f.name for f in taken if not f.valid} and len(shown) == min(invalid, 20)
