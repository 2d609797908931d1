"""The REST API's search features against a real PostgreSQL: metadata filters, several examples, a region of the
query, and exports (stand-in embedder)."""
import csv
import inspect
import io
import json
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.api.routes import search as search_routes
from backend.config import settings
from backend.errors import DatasetUnavailable
from backend.pipeline.datasets import load_dataset
from backend.service import export, metadata_keys
from backend.service.image_search import ImageSearch
from tests.helpers import PixelEmbedder, png_bytes

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def _png(rgb, size=32):
    return png_bytes(Image.new("RGB", (size, size), rgb))


@pytest.fixture
def client(sessions, tmp_path, monkeypatch):
    """18 plain-colour images, 6 per category, uploaded with metadata: n (0-17), shade (light/dark), size (a number),
    and `rare` on two of them."""
    monkeypatch.setattr(settings, "open_writes", True)
    with TestClient(create_app(lambda: ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")),
                    base_url="http://localhost") as c:
        n = 0
        for name, (r, g, b) in COLOURS.items():
            for i in range(6):
                meta = {"n": n, "shade": "light" if i % 2 else "dark", "size": 10 * i}
                if n in (4, 13):
                    meta["rare"] = True
                shade = 3 * i
                added = c.post("/upload", data={"category": name, "metadata": json.dumps(meta)},
                               files={"file": ("x.png", _png((r - shade, g - shade, b - shade)), "image/png")})
                assert added.status_code == 200, added.text
                n += 1
        yield c


def _ids(response):
    assert response.status_code == 200, response.text
    return [h["image_id"] for h in response.json()["results"]]


def _meta(client, image_id):
    return client.get(f"/images/{image_id}/info").json()["metadata"]


def test_filters_in_query_string_form_and_json(client):
    blue = {"file": ("q.png", _png(COLOURS["blue"]), "image/png")}
    dark = client.post("/search?use_prototypes=false&limit=50&filter=shade:dark", files=blue).json()["results"]
    assert len(dark) == 9 and all(h["metadata"]["shade"] == "dark" for h in dark)
    ranged = _ids(client.post("/search?use_prototypes=false&limit=50&filter=size:gte:20&filter=size:lt:40"
                              "&filter=shade:in:light,dark", files=blue))
    assert sorted(_meta(client, i)["size"] for i in ranged) == [20, 20, 20, 30, 30, 30]
    assert len(_ids(client.post("/search?limit=50&filter=rare:exists", files=blue))) == 2
    assert len(_ids(client.post("/search?use_prototypes=false&limit=50&filter=rare:missing", files=blue))) == 16
    assert len(_ids(client.post("/search?use_prototypes=false&limit=50&filter=n:4", files=blue))) == 1
    as_json = client.post("/search?use_prototypes=false&limit=50", files=blue,
                          data={"filters": json.dumps({"size": {"gte": 20, "lt": 40}})})
    assert sorted(_ids(as_json)) == sorted(ranged)
    combined = _ids(client.post("/search?use_prototypes=false&limit=50&category=red&filter=shade:dark", files=blue))
    assert len(combined) == 3
    # Stage 1 ranks only the categories holding matches: a red image is found for a blue query.
    red_rare = client.post("/search?prototype_limit=1&filter=rare:exists&filter=n:4", files=blue).json()
    assert [h["category"] for h in red_rare["results"]] == ["red"]
    for bad in ("filter=nocolon", "filter=size:gte:big", "filter=" + "&filter=".join(f"k{i}:v" for i in range(21))):
        response = client.post(f"/search?{bad}", files=blue)
        assert response.status_code == 422 and response.json()["detail"], bad
    for bad in ("not json", "[1]", json.dumps({"a": {"like": 1}})):
        response = client.post("/search", files=blue, data={"filters": bad})
        assert response.status_code == 422 and "filter" in response.json()["detail"], bad


@pytest.mark.parametrize("key", ["", "k" * 101, "a\x00", "a\x1fb", "a\x7f", "a\x85b"])
def test_one_rule_for_metadata_keys_in_uploads_filters_and_csv_columns(client, key, tmp_path):
    upload = client.post("/upload", data={"category": "red", "metadata": json.dumps({key: 1})},
                         files={"file": ("k.png", _png((4, 5, 6)), "image/png")})
    as_json = client.post("/search/examples", json={"positive_ids": [1], "filter": {key: 1}})
    as_query = client.get("/images/1/similar", params={"filter": f"{key}:1"})
    for refused in (upload, as_json, as_query):
        assert refused.status_code == 422 and "metadata" in refused.json()["detail"], (key, refused.text)
    (tmp_path / "k.csv").write_text(f"file,category,{key}\na.png,red,1\n", encoding="utf-8")
    if key.strip():  # a blank column is no metadata at all
        with pytest.raises(DatasetUnavailable, match="metadata key"):
            load_dataset("csv", data_dir=tmp_path / "k.csv")


def test_metadata_keys_and_bad_upload_metadata(client, monkeypatch):
    keys = {k["key"]: k for k in client.get("/metadata/keys").json()}
    assert set(keys) == {"n", "shade", "size", "rare"}
    assert keys["shade"]["values"] == [{"value": "dark", "images": 9}, {"value": "light", "images": 9}]
    assert (keys["size"]["min"], keys["size"]["max"], keys["size"]["types"]) == (0, 50, ["number"])
    assert keys["rare"]["images"] == 2 and keys["rare"]["types"] == ["boolean"]
    for bad in ("not json", "[1, 2]", json.dumps({"": 1}), json.dumps({"a\u0001": 1}), json.dumps({"a": "\u0000"}),
                "x" * 10_001, '{"a": NaN}', '{"a": 1e999}', '{"a": ' + "9" * 400 + "}", '{"a": "\\ud800"}',
                '{"a": ' + "[" * 3000 + "]" * 3000 + "}"):
        response = client.post("/upload", data={"category": "red", "metadata": bad},
                               files={"file": ("y.png", _png((1, 2, 3)), "image/png")})
        assert response.status_code == 422 and "metadata" in response.text.lower(), bad
    summaries = []
    real = metadata_keys.filters.summarise_keys
    monkeypatch.setattr(metadata_keys.filters, "summarise_keys", lambda s: summaries.append(1) or real(s))
    added = client.post("/upload", data={"category": "red", "metadata": json.dumps({"studio": "north"})},
                        files={"file": ("y.png", _png((1, 2, 3)), "image/png")})
    assert added.status_code == 200
    assert "studio" not in {k["key"] for k in client.get("/metadata/keys").json()} and not summaries  # too soon
    monkeypatch.setattr(metadata_keys, "KEYS_MIN_AGE", 0.0)
    assert "studio" in {k["key"] for k in client.get("/metadata/keys").json()}  # a write made the summary stale
    client.get("/metadata/keys")
    assert len(summaries) == 1  # ... and nothing since


def test_several_examples_uploaded_and_stored_with_negatives(client):
    blue, green = _png(COLOURS["blue"]), _png(COLOURS["green"])
    cyan = _png((20, 230, 230))
    stored_blue = _ids(client.post("/search?limit=1", files={"file": ("b.png", blue, "image/png")}))[0]
    both = client.post(f"/search?use_prototypes=false&limit=11&positive_id={stored_blue}",
                       files=[("file", ("c.png", cyan, "image/png"))]).json()["results"]
    assert stored_blue not in [h["image_id"] for h in both] and {h["category"] for h in both} == {"blue", "green"}
    cyan_alone = client.post("/search?use_prototypes=false&limit=6", files={"file": ("c.png", cyan, "image/png")})
    assert "green" in {h["category"] for h in cyan_alone.json()["results"]}  # ... until green is a negative:
    unlike_green = client.post("/search?use_prototypes=false&limit=6", files=[
        ("file", ("c.png", cyan, "image/png")), ("negative_file", ("g.png", green, "image/png"))]).json()["results"]
    assert [h["category"] for h in unlike_green] == ["blue"] * 6
    green_ids = _ids(client.post("/search?use_prototypes=false&limit=2", files={"file": ("g.png", green, "image/png")}))
    body = {"positive_ids": [stored_blue], "negative_ids": green_ids, "use_prototypes": False, "limit": 5,
            "filter": {"shade": "light"}, "strategy": "max"}
    by_ids = client.post("/search/examples", json=body).json()["results"]
    assert len(by_ids) == 5 and all(h["metadata"]["shade"] == "light" for h in by_ids)
    assert not {stored_blue, *green_ids} & {h["image_id"] for h in by_ids}
    for bad in ({"positive_ids": []}, {"positive_ids": [1] * 11}, {"positive_ids": [1], "strategy": "median"},
                {"positive_ids": [1], "filter": {"a": {"gt": "x"}}}, {"positive_ids": [stored_blue],
                                                                        "negative_ids": [stored_blue],
                                                                        "negative_weight": 1, "strategy": "mean"}):
        response = client.post("/search/examples", json=body | bad)
        assert response.status_code == 422 and response.json()["detail"], bad
    assert client.post("/search/examples", json={"positive_ids": [10**12]}).status_code == 404
    for hostile in ({"positive_ids": [stored_blue], "filter": {"x": 10**400}},
                    {"positive_ids": [stored_blue], "filter": {"x": {"gte": -(10**30)}}},
                    {"positive_ids": [stored_blue], "filter": {"x": "\ud800"}}):
        response = client.post("/search/examples", content=json.dumps(hostile),
                               headers={"content-type": "application/json"})
        assert response.status_code == 422, hostile
    nested = '{"positive_ids": [1], "filter": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    assert client.post("/search/examples", content=nested, headers={"content-type": "application/json"}).status_code \
        in (400, 422)
    for bad in ('{"x": NaN}', '{"x": ' + "9" * 400 + "}", '{"x": ' + "[" * 3000 + "]" * 3000 + "}"):
        assert client.post("/search", files={"file": ("b.png", blue, "image/png")}, data={"filters": bad}) \
            .status_code == 422, bad[:20]
    eleven = [("file", (f"{i}.png", blue, "image/png")) for i in range(11)]
    assert client.post("/search", files=eleven).status_code == 422


def test_crop_rotate_and_flip(client):
    # Left half red, right half blue: the right half alone finds blue images.
    halves = Image.new("RGB", (200, 100), COLOURS["red"])
    halves.paste(COLOURS["blue"], (100, 0, 200, 100))
    query = {"file": ("h.png", png_bytes(halves), "image/png")}
    for crop in ("100,0,100,100", "0.5,0,0.5,1.0"):
        hits = client.post(f"/search?use_prototypes=false&limit=3&crop={crop}", files=query).json()["results"]
        assert [h["category"] for h in hits] == ["blue"] * 3, crop
    flipped = client.post("/search?use_prototypes=false&limit=3&crop=100,0,100,100&flip=horizontal&rotate=90",
                          files=query).json()["results"]
    assert [h["category"] for h in flipped] == ["blue"] * 3
    for bad in ("crop=1,2,3", "crop=0,0,0,5", "crop=500,500,10,10", "rotate=45", "flip=diagonal",
                "crop=0.5,0,1.5,1.0"):
        response = client.post(f"/search?{bad}", files=query)
        assert response.status_code == 422 and response.json()["detail"], bad


def test_exports_csv_json_and_zip(client):
    blue = {"file": ("b.png", _png(COLOURS["blue"]), "image/png")}
    shown = client.post("/search?use_prototypes=false&limit=18", files=blue).json()["results"]
    as_csv = client.post("/search/export?format=csv&use_prototypes=false&limit=18", files=blue)
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert 'filename="imsrc-results.csv"' in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["image_id"]) for r in rows] == [h["image_id"] for h in shown]
    assert json.loads(rows[0]["metadata"]) == shown[0]["metadata"] and rows[0]["image_url"] == shown[0]["image_url"]
    as_json = client.post("/search/export?format=json&use_prototypes=false&limit=5&filter=shade:dark",
                          files=blue).json()
    assert as_json["query"]["filter"] == ["shade:dark"] and len(as_json["results"]) == 5
    assert all(r["metadata"]["shade"] == "dark" for r in as_json["results"])
    first = shown[0]["image_id"]
    as_zip = client.get(f"/images/{first}/similar/export?format=zip&use_prototypes=false&limit=17")
    archive = zipfile.ZipFile(io.BytesIO(as_zip.content))
    manifest = json.loads(archive.read("manifest.json"))
    assert len(manifest["results"]) == 17 and manifest["images_left_out"] == 0
    some = manifest["results"][3]
    assert archive.read(some["file"]) == client.get(some["image_url"]).content
    by_ids = client.post("/search/examples/export?format=csv", json={"positive_ids": [first], "limit": 1000})
    assert by_ids.status_code == 200 and len(list(csv.DictReader(io.StringIO(by_ids.text)))) == 17
    assert client.post("/search/export?format=xml", files=blue).status_code == 422
    assert client.post("/search/export?format=csv&limit=1001", files=blue).status_code == 422


def test_zip_export_stops_at_its_byte_limit(client, monkeypatch):
    one = len(client.get("/images/1").content)
    monkeypatch.setattr(export, "ZIP_MAX_BYTES", one * 3)
    as_zip = client.get("/images/1/similar/export?format=zip&use_prototypes=false&limit=10")
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(as_zip.content)).read("manifest.json"))
    included = [r for r in manifest["results"] if r["file"]]
    assert 1 <= len(included) <= 3 and manifest["images_left_out"] == 10 - len(included)


def test_the_search_routes_dependencies_run_on_the_event_loop():
    """FastAPI runs a plain `def` dependency in its thread pool: a hand-off to another thread and back per
    dependency per search. Those of the search routes never block, so none may be a plain def."""
    def calls(dependant):
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    routes = {route.path: route for route in search_routes.router.routes}
    for path in ("/search", "/search/examples", "/search/prototypes"):
        plain = [call.__name__ for call in calls(routes[path].dependant) if not inspect.iscoroutinefunction(call)]
        assert plain == [], f"{path}: {plain}"
