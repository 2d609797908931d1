"""Operations: Prometheus metrics at GET /metrics and a request id in every log line (real PostgreSQL)."""
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from backend.api.telemetry import RequestIdFilter, request_id
from tests.helpers import ROOT, png_bytes, running_server, write_folder_dataset


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def client(folder_client):
    return folder_client(n_per_class=4, open_writes=False)


def test_metrics_count_requests_per_route_template_and_time_search_stages(client):
    before = _samples(client.get("/metrics").text)
    query = {"file": ("q.png", png_bytes(Image.new("RGB", (32, 32), (10, 10, 230))), "image/png")}
    for _ in range(3):
        assert client.post("/search", files=query).status_code == 200
    for image_id in (1, 2):
        assert client.get(f"/images/{image_id}/info").status_code == 200
    assert client.get("/images/999999/info").status_code == 404
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = _samples(response.text)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("imsrc_requests_total", method="POST", route="/search", status="200") == 3
    assert grew("imsrc_requests_total", method="GET", route="/images/{image_id}/info", status="200") == 2
    assert grew("imsrc_requests_total", method="GET", route="/images/{image_id}/info", status="404") == 1
    assert grew("imsrc_request_seconds_count", method="POST", route="/search") == 3
    for stage in ("embedding", "search", "lookup"):
        assert grew("imsrc_search_stage_seconds_count", stage=stage) == 3, stage
    assert after[("imsrc_index_vectors", (("collection", "default"), ("index_type", "flatip"), ("model", "test-pixels")))] == 12
    assert ("imsrc_image_jobs", ()) in after
    assert not any("/images/1/" in str(key) for key in after)  # one series per route, not per id


def test_every_response_and_log_line_carries_the_request_id(client, caplog):
    caplog.set_level(logging.INFO)
    given = client.get("/images/999999/info", headers={"X-Request-ID": "trace-abc.1"})
    assert given.headers["x-request-id"] == "trace-abc.1"
    made = client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    hostile = client.get("/health", headers={"X-Request-ID": "x" * 500 + "\n"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", hostile)  # an untame id is replaced, not echoed into logs
    caplog.handler.addFilter(RequestIdFilter())  # as `serve` installs it on every handler
    token = request_id.set("abc123")  # what the middleware does for the length of a request
    logging.getLogger("backend.test").info("during a request")
    request_id.reset(token)
    logging.getLogger("backend.test").info("outside a request")
    assert [r.request_id for r in caplog.records[-2:]] == ["abc123", "-"]


@pytest.mark.slow
def test_served_logs_show_the_request_id_and_workers_share_metrics(cli_env, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=3)
    populate = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "folder", "--data-dir",
                               str(tmp_path / "f")], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                              timeout=300)
    assert populate.returncode == 0, populate.stderr
    log = tmp_path / "server.log"
    with running_server(cli_env, log, "--workers", "2") as (base, _):
        workers, deadline = set(), time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:  # the second may still be loading its model
            with urllib.request.urlopen(base + "/status", timeout=30) as r:
                workers.add(json.loads(r.read())["worker"])
            time.sleep(0.2)
        assert len(workers) == 2
        for _ in range(6):
            request = urllib.request.Request(base + "/categories", headers={"X-Request-ID": "ops-check-7"})
            with urllib.request.urlopen(request, timeout=30) as r:
                assert r.headers["X-Request-ID"] == "ops-check-7"
        totals = []
        for _ in range(4):  # whichever worker answers, it reports both workers' counts
            with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
                samples = _samples(r.read().decode())
            totals.append(samples[("imsrc_requests_total",
                                   (("method", "GET"), ("route", "/categories"), ("status", "200")))])
            assert len({k for k in samples if k[0] == "imsrc_index_vectors"}) == 2  # one series per live worker
        assert totals == [6.0] * 4
        ready = f"imsrc: ready: open http://localhost:{base.rsplit(':', 1)[1]}/app/"
        while ready not in log.read_text() and time.monotonic() < deadline:  # the supervisor's probe, every 0.5 s
            time.sleep(0.1)
    served = log.read_text()
    # The address is given once, for both workers, and only once a worker answers: a newcomer can open it at once.
    assert served.count("imsrc: ready: open") == 1 and served.index("Application startup complete") < served.index(ready)
    lines = [line for line in log.read_text().splitlines() if "/categories" in line]
    assert len(lines) == 6 and all("[ops-check-7]" in line for line in lines)
