"""PostgreSQL stops under a running API: every endpoint answers 503 JSON with Retry-After within 2 s, nothing
stored is lost, and the API recovers without a restart when the server is back."""
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import sessionmaker

from backend.api.app import create_app
from backend.config import settings
from backend.storage.embedded_server import EmbeddedPostgres
from backend.storage.migrations import migrated_engine
from tests.helpers import folder_opener, png_bytes

pytestmark = pytest.mark.slow


def _file(rgb=(20, 20, 230)):
    return {"file": ("q.png", png_bytes(Image.new("RGB", (32, 32), rgb)), "image/png")}


REQUESTS = [
    ("post", "/search", {"files": _file()}),
    ("post", "/search/prototypes", {"files": _file()}),
    ("get", "/images/1/similar", {}),
    ("get", "/images/1", {}),
    ("get", "/images/1/info", {}),
    ("get", "/categories", {}),
    ("get", "/categories/1/images", {}),
    ("get", "/status", {}),
    ("post", "/upload", {"files": _file((1, 99, 1)), "data": {"category": "new"}}),
    ("delete", "/images/2", {}),
    ("post", "/admin/refresh", {}),
    ("post", "/admin/rebuild-index", {}),
    ("post", "/admin/rebuild-prototypes", {}),
]


def test_database_outage_gives_503_json_then_recovers_without_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "open_writes", True)
    server = EmbeddedPostgres(tmp_path / "pg")
    engine = migrated_engine(server.acquire(), "outage")
    sessions = sessionmaker(engine, expire_on_commit=False)
    open_search = folder_opener(sessions, tmp_path)
    try:
        with TestClient(create_app(open_search), base_url="http://localhost") as client:
            assert client.get("/health").status_code == 200
            stored = client.get("/status").json()["images"]
            server.release()  # the only user: this stops PostgreSQL
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["database"] is False
            for method, path, kwargs in REQUESTS:
                started = time.monotonic()
                response = getattr(client, method)(path, **kwargs)
                took = time.monotonic() - started
                assert response.status_code == 503, (method, path, response.status_code, response.text)
                assert "database" in response.json()["detail"] and response.headers["retry-after"], (method, path)
                assert took < 2, (method, path, took)
            server.acquire()  # PostgreSQL is back; the API was not restarted
            assert client.get("/health").status_code == 200
            assert client.get("/status").json()["images"] == stored  # nothing lost, nothing half-written
            assert client.post("/search", files=_file()).status_code == 200
            assert client.post("/upload", files=_file((1, 99, 1)), data={"category": "new"}).status_code == 200
            assert client.get("/status").json()["images"] == stored + 1
    finally:
        engine.dispose()
        server.release()
