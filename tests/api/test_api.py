"""The REST API against a real PostgreSQL and a small real collection (stand-in embedder)."""
import os
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.config import settings
from backend.service.image_search import ImageSearch
from tests.helpers import PixelEmbedder, png_bytes


@pytest.fixture
def client(folder_client):
    return folder_client(n_per_class=6)


def _file(rgb=(20, 20, 230), fmt="PNG", name="q.png"):
    return {"file": (name, png_bytes(Image.new("RGB", (32, 32), rgb), fmt), "image/png")}


def test_root_health_status_docs(client):
    assert client.get("/", headers={"accept": "application/json"}).json()["docs"] == "/docs"
    browser = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert browser.status_code == 307 and browser.headers["location"] == "/app/"
    assert client.get("/health").json() == {"status": "ok", "database": True, "index": True}
    status = client.get("/status").json()
    assert status["images"] == 18 and status["index_size"] == 18 and status["model"] == "test-pixels"
    assert status["database"] == "embedded" and status["index_type"] == "flatip"
    engine = status["engine"]  # which engine runs the model in this process, and why
    assert engine["runtime"] in ("torch", "openvino") and engine["precision"] in ("fp32", "bf16") and engine["why"]
    spec = client.get("/openapi.json").json()
    for path in ("/search", "/search/prototypes", "/upload", "/images/{image_id}", "/images/{image_id}/info",
                 "/images/{image_id}/similar", "/categories", "/categories/{category_id}/images",
                 "/admin/rebuild-index", "/admin/rebuild-prototypes", "/health", "/status"):
        assert path in spec["paths"], path
    assert "413" in spec["paths"]["/search"]["post"]["responses"]
    assert client.get("/docs").status_code == 200
    page = client.get("/app/")
    assert page.status_code == 200 and "Search Similar Images" in page.text


def test_the_query_path_is_warmed_up_before_the_server_reports_ready(sessions, tmp_path, monkeypatch):
    embedder = PixelEmbedder()
    served = []
    real_search = ImageSearch.search
    monkeypatch.setattr(ImageSearch, "search", lambda self, r, *a: served.append(
        (r.k, r.use_prototypes, r.top_categories, r.category, list(r.where))) or real_search(self, r, *a))
    with TestClient(create_app(lambda: ImageSearch(sessions, embedder, snapshot_dir=tmp_path / "snap"))) as c:
        assert embedder.calls == 1  # one search ran through decode, embed, search and look-up at start-up
        assert served == [(1, True, 3, None, [])]  # ... through the API: limit=1 from its query string
        assert c.get("/health").status_code == 200


def test_search_returns_scored_hits_with_urls_and_timings(client):
    body = client.post("/search?limit=4&prototype_limit=1", files=_file()).json()
    assert [h["category"] for h in body["results"]] == ["blue"] * 4
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
    assert body["prototypes"][0]["category"] == "blue" and len(body["prototypes"]) == 1
    assert {"embedding", "search"} <= set(body["timings_ms"])
    image = client.get(body["results"][0]["image_url"])
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    assert "immutable" in image.headers["cache-control"]
    assert client.get(body["results"][0]["image_url"], headers={"if-none-match": image.headers["etag"]}).status_code == 304
    exhaustive = client.post("/search?use_prototypes=false&limit=50", files=_file()).json()
    assert len(exhaustive["results"]) == 18 and exhaustive["prototypes"] == []
    only_red = client.post("/search?category=red&use_prototypes=false", files=_file()).json()
    assert {h["category"] for h in only_red["results"]} == {"red"}
    protos = client.post("/search/prototypes?prototype_limit=2", files=_file()).json()
    assert [p["category"] for p in protos["prototypes"]][0] == "blue" and len(protos["prototypes"]) == 2
    first = body["results"][0]["image_id"]
    more = client.get(f"/images/{first}/similar?limit=3").json()
    assert len(more["results"]) == 3 and first not in [h["image_id"] for h in more["results"]]


def test_upload_duplicate_info_delete(client):
    up = client.post("/upload", files=_file((250, 250, 0), name="sun.png"), data={"category": "yellow"})
    assert up.status_code == 200 and up.json()["duplicate"] is False
    image_id = up.json()["image_id"]
    again = client.post("/upload", files=_file((250, 250, 0)), data={"category": "yellow"}).json()
    assert again["duplicate"] is True and again["image_id"] == image_id
    info = client.get(f"/images/{image_id}/info").json()
    assert info["category"] == "yellow" and info["original_name"] == "sun.png" and info["width"] == 32
    cats = {c["name"]: c for c in client.get("/categories").json()}
    assert cats["yellow"]["image_count"] == 1
    page = client.get(f"/categories/{cats['red']['category_id']}/images?limit=4").json()
    assert page["total"] == 6 and len(page["images"]) == 4
    by_id = client.post("/upload", files=_file((1, 250, 250)), data={"category_id": cats["yellow"]["category_id"]})
    assert by_id.json()["category"] == "yellow"
    assert client.post("/search?prototype_limit=1", files=_file((250, 250, 0))).json()["results"][0]["image_id"] == image_id
    assert client.delete(f"/images/{image_id}").status_code == 204
    assert client.get(f"/images/{image_id}/info").status_code == 404
    assert client.delete(f"/images/{image_id}").status_code == 404
    rebuilt = client.post("/admin/rebuild-index").json()
    assert rebuilt["indexed_images"] == 19 and rebuilt["prototypes"] == 4
    assert client.post("/admin/rebuild-prototypes").json()["prototypes"] == 4


def test_status_shows_live_sync_and_admin_check_compares_this_worker_s_index(client, sessions, tmp_path):
    other = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "other")
    other.add_image(png_bytes(Image.new("RGB", (32, 32), (7, 7, 7))), "grey")
    deadline = time.monotonic() + 2
    while (status := client.get("/status").json())["index_size"] != 19 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status["index_size"] == 19 and status["worker"] == os.getpid()
    sync = status["sync"]
    assert sync["listening"] and sync["changes_applied"] >= 1 and sync["error"] is None
    assert 0 <= sync["lag_ms"] < 2000 and sync["last_change_at"] and sync["last_applied_at"]
    check = client.get("/admin/check").json()
    assert check["ok"] and check["findings"] == [] and check["worker"] == os.getpid()


def test_refresh_picks_up_another_process_s_writes(client, sessions, tmp_path):
    client.app.state.collections.default.listener.stop()  # by hand, as when live sync is cut off
    other = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "other")
    added = other.add_image(png_bytes(Image.new("RGB", (32, 32), (7, 7, 7))), "grey")
    assert client.post("/admin/refresh").json() == {"added": 1, "removed": 0, "indexed_images": 19}
    assert client.get(f"/images/{added.image_id}/similar?limit=1").status_code == 200


@pytest.mark.parametrize("request_kwargs, code, message", [
    ({"files": {"file": ("x.txt", b"hello, not an image", "text/plain")}}, 400, "not an image"),
    ({"files": {"file": ("t.jpg", png_bytes(Image.new("RGB", (64, 64)), "JPEG")[:300], "image/jpeg")}}, 400, "truncated"),
    ({"files": {"file": ("x.ico", png_bytes(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon")}}, 415, "unsupported image format"),
    ({"files": {"file": ("e.png", b"", "image/png")}}, 400, "empty"),
    ({}, 422, "file"),
])
def test_bad_uploads_get_specific_errors(client, request_kwargs, code, message):
    response = client.post("/search", **request_kwargs)
    assert response.status_code == code and message in response.json()["detail"]


def _unsupported_files() -> dict[str, bytes]:
    """A small image in each format imsrc does not read, as the tools that make them write it."""
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    files = {fmt: png_bytes(img, fmt) for fmt in ("TGA", "PCX", "SGI", "EPS", "TIFF", "ICO")}
    files["TGA (RLE, no footer)"] = png_bytes(img, "TGA", compression="tga_rle")[:-26]
    files["DDS"] = png_bytes(img.convert("RGBA"), "DDS")
    files["PostScript"] = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    files["CUR"] = files["ICO"][:2] + b"\x02\x00" + files["ICO"][4:]  # a cursor: an icon of type 2
    return files


@pytest.mark.parametrize("name, data", sorted(_unsupported_files().items()))
def test_every_format_imsrc_does_not_read_is_415_listing_those_it_does(client, name, data):
    for path in ("/search", "/upload"):
        response = client.post(path, files={"file": ("x.bin", data, "application/octet-stream")},
                               data={"category": "red"})
        detail = response.json()["detail"]
        assert response.status_code == 415, (path, detail)
        assert f"unsupported image format {name.split(' ')[0]}" in detail and "JPEG, MPO, PNG, WEBP" in detail


def test_out_of_range_parameters_and_unknown_ids(client):
    for query in ("limit=0", "limit=51", "prototype_limit=11", "use_prototypes=maybe"):
        response = client.post(f"/search?{query}", files=_file())
        assert response.status_code == 422, query
        assert query.split("=")[0] in response.json()["detail"]
    assert client.get("/images/999999").status_code == 404
    assert client.get("/images/999999/similar").status_code == 404
    assert client.get("/categories/999999/images").status_code == 404
    assert client.get("/images/abc").status_code == 422
    assert client.post("/search?category=purple", files=_file()).status_code == 404
    missing_category = client.post("/upload", files=_file((9, 9, 9)))
    assert missing_category.status_code == 422 and "category" in missing_category.json()["detail"]


def test_file_over_the_upload_limit_is_413(client, monkeypatch):
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(settings, "max_upload_size", 1000)
    response = client.post("/search", files={"file": ("big.png", png_bytes(noise), "image/png")})
    assert response.status_code == 413 and "1,000 bytes" in response.json()["detail"]


def test_writes_need_the_api_key_when_one_is_set(client, monkeypatch):
    monkeypatch.setattr(settings, "api_key", "s3cret")
    assert client.post("/upload", files=_file((5, 5, 5)), data={"category": "x"}).status_code == 401
    assert client.delete("/images/1").status_code == 401
    assert client.post("/admin/rebuild-index").status_code == 401
    ok = client.post("/upload", files=_file((5, 5, 5)), data={"category": "x"}, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200
    assert client.post("/search", files=_file()).status_code == 200  # reads stay open


def test_not_ready_is_503_with_the_reason(sessions, tmp_path):
    from backend.errors import ModelUnavailable

    def failing():
        raise ModelUnavailable("weights missing: set MODEL_WEIGHTS_PATH")

    with TestClient(create_app(failing)) as c:
        assert c.get("/health").status_code == 503
        response = c.post("/search", files=_file())
        assert response.status_code == 503 and "MODEL_WEIGHTS_PATH" in response.json()["detail"]


def test_results_page_through_one_ranking_and_stop_at_min_score(client):
    whole = client.post("/search?use_prototypes=false&limit=12", files=_file()).json()["results"]
    first = client.post("/search?use_prototypes=false&limit=5", files=_file()).json()
    second = client.post("/search?use_prototypes=false&limit=5&offset=5", files=_file()).json()
    assert [h["image_id"] for h in first["results"] + second["results"]] == [h["image_id"] for h in whole[:10]]
    assert [h["rank"] for h in second["results"]] == [6, 7, 8, 9, 10]
    assert (first["offset"], first["next_offset"], second["next_offset"]) == (0, 5, 10)
    last = client.post("/search?use_prototypes=false&limit=5&offset=15", files=_file()).json()
    assert len(last["results"]) == 3 and last["next_offset"] is None  # 18 images in all
    floor = whole[4]["score"]
    above = client.post(f"/search?use_prototypes=false&limit=12&min_score={floor}", files=_file()).json()
    assert [h["image_id"] for h in above["results"]] == [h["image_id"] for h in whole if h["score"] >= floor]
    assert above["next_offset"] is None and all(h["score"] >= floor for h in above["results"])
    stored = whole[0]["image_id"]
    similar = client.get(f"/images/{stored}/similar?limit=4&offset=2").json()
    assert [h["rank"] for h in similar["results"]] == [3, 4, 5, 6] and similar["next_offset"] == 6
    assert stored not in [h["image_id"] for h in similar["results"]]
    for bad in ("offset=-1", "offset=951", "min_score=2"):
        response = client.post(f"/search?{bad}", files=_file())
        assert response.status_code == 422 and response.json()["detail"], bad
