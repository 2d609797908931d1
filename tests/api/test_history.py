"""Search history and analytics: recorded by the API in PostgreSQL, paged, run again, pruned, switched off
(real PostgreSQL, stand-in embedder)."""
import json

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.config import settings
from backend.service.image_search import ImageSearch
from backend.storage import history
from backend.storage.tables import SearchRecord
from tests.helpers import PixelEmbedder, png_bytes, write_folder_dataset


def _app(sessions, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=5)

    def open_search():
        search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
        search.build_database("folder", tmp_path / "f", progress=False)
        return search
    return create_app(open_search)


@pytest.fixture
def client(sessions, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "open_writes", True)  # the history is guarded as writes are (test_access.py)
    with TestClient(_app(sessions, tmp_path), base_url="http://localhost") as c:
        yield c


def _query(rgb=(10, 10, 230)):
    return {"file": ("q.png", png_bytes(Image.new("RGB", (32, 32), rgb)), "image/png")}


def test_searches_are_recorded_paged_and_run_again(client, sessions):
    first = client.post("/search?limit=5&use_prototypes=false&filter=x:missing", files=_query()).json()
    stored = first["results"][0]["image_id"]
    client.get(f"/images/{stored}/similar?limit=3")
    client.post("/search/examples", json={"positive_ids": [stored], "negative_ids": [first["results"][1]["image_id"]]})
    page = client.get("/history?limit=2").json()
    assert page["total"] == 3 and [e["kind"] for e in page["entries"]] == ["stored", "stored"]
    older = client.get("/history?limit=2&offset=2").json()["entries"]
    assert len(older) == 1 and older[0]["kind"] == "upload"
    entry = older[0]
    assert entry["result_ids"] == [h["image_id"] for h in first["results"]]
    assert entry["params"]["k"] == 5 and entry["params"]["where"] == [{"key": "x", "op": "exists", "value": False}]
    assert entry["query_sha256"] and {"embedding", "search"} <= set(entry["timings_ms"])
    thumb = client.get(entry["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    again = client.post(f"/history/{entry['id']}/run").json()
    assert [h["image_id"] for h in again["results"]] == entry["result_ids"]
    assert [round(h["score"], 4) for h in again["results"]] == [round(s, 4) for s in entry["result_scores"]]
    assert client.get("/history").json()["total"] == 4  # the re-run is recorded too
    assert client.post("/history/999999/run").status_code == 404
    assert client.get("/history/999999/thumbnail").status_code == 404
    assert client.get("/history?limit=0").status_code == 422
    with sessions() as s:  # nothing the API did not record
        assert s.scalar(sa.select(sa.func.count()).select_from(SearchRecord)) == 4


def test_analytics_count_per_day_latency_categories_and_images(client):
    for rgb in [(10, 10, 230)] * 3 + [(230, 10, 10)]:
        client.post("/search?limit=4&use_prototypes=false", files=_query(rgb))
    stats = client.get("/analytics?days=7").json()
    assert stats["searches"] == 4 and len(stats["per_day"]) == 1 and stats["per_day"][0]["searches"] == 4
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p95"] <= stats["latency_ms"]["p99"]
    assert stats["top_categories"][0] == {"category": "blue", "searches": 3}
    assert stats["top_categories"][1] == {"category": "red", "searches": 1}
    assert stats["top_images"][0]["times_returned"] == 3
    assert client.get("/analytics?days=0").status_code == 422


def test_retention_prunes_and_the_switch_turns_recording_off(sessions, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "open_writes", True)
    with TestClient(_app(sessions, tmp_path), base_url="http://localhost") as client:
        client.post("/search", files=_query())
        assert client.get("/history").json()["total"] == 1  # written off the request path; a read waits for it
        with sessions() as s, s.begin():
            s.execute(sa.update(SearchRecord).values(at=sa.func.now() - sa.text("interval '40 days'")))
        monkeypatch.setattr(history, "PRUNE_EVERY", 1)  # prune at the next recording
        client.post("/search", files=_query())
        assert client.get("/history").json()["total"] == 1  # the 40-day-old one is gone (retention 30 days)
    monkeypatch.setattr(settings, "history_enabled", False)
    with TestClient(_app(sessions, tmp_path / "off"), base_url="http://localhost") as client:
        client.post("/search", files=_query())
        assert client.get("/history").json()["total"] == 1
        assert json.loads(client.get("/status").content)["history"] is False


def test_the_history_is_private_unless_writes_are_open(client, monkeypatch):
    monkeypatch.setattr(settings, "open_writes", False)
    assert client.get("/history").status_code == 403  # it shows what people searched for
    assert client.get("/analytics").status_code == 200  # counts only
