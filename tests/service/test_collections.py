"""Collections against the real PostgreSQL: each its own schema, model and index; bytes shared; never crossed."""
import json
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa
from PIL import Image

from backend.errors import InvalidQuery, NotFound
from backend.search.snapshot import SUFFIX
from backend.service.image_search import ImageSearch
from backend.storage import collections
from backend.storage import images as image_store
from backend.storage.collections import CollectionExists, CollectionSessions
from backend.storage.engine import create_engine_checked
from backend.storage.migrations import migrate, migrate_schema
from tests.helpers import PixelEmbedder, png_bytes, write_folder_dataset


class OtherPixels(PixelEmbedder):
    """A second stand-in model: the same vectors under another name (a collection has its own model)."""

    name = "test-pixels-b"


def _colour(rgb) -> bytes:
    return png_bytes(Image.new("RGB", (32, 32), rgb))


def _blob_count(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT count(*) FROM public.image_blobs"))


@pytest.fixture
def registry(engine):
    return CollectionSessions(engine)


def test_collections_keep_their_own_images_models_and_indexes_and_share_bytes(engine, registry, tmp_path):
    collections.create_collection(engine, "products", description="shop photos")
    default = ImageSearch(registry.sessions("default"), PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    products = ImageSearch(registry.sessions("products"), OtherPixels(), snapshot_dir=tmp_path / "snap")
    assert (default.collection, default.schema) == ("default", "public")
    assert (products.collection, products.schema) == ("products", "c_products")
    red, blue = _colour((230, 20, 20)), _colour((20, 20, 230))
    in_default = default.add_image(red, "reds").image_id
    in_products = products.add_image(red, "warm").image_id  # the same picture in both
    products.add_image(blue, "cool")
    assert _blob_count(engine) == 2  # red's bytes once, though two collections hold it
    # Each collection finds only its own images, under its own categories and model.
    hits = products.search_similar(red, k=10).results
    assert {h.category for h in hits} == {"warm", "cool"} and hits[0].image_id == in_products
    assert [h.category for h in default.search_similar(red, k=10).results] == ["reds"]
    with registry.sessions("products")() as s:
        counts = image_store.counts(s)
    assert counts["images"] == 2 and counts["embeddings"] == {"test-pixels-b": 2}
    with registry.sessions("default")() as s:
        assert image_store.counts(s)["embeddings"] == {"test-pixels": 1}
        assert image_store.get_image(s, in_default, with_data=True)[0].data == red
    # A collection's snapshots are its own: two collections may use one model and index type.
    products.save_snapshot()
    assert len(list((tmp_path / "snap" / "collections" / "products").glob(f"test-pixels-b*{SUFFIX}"))) == 1
    assert products.snapshot_base == default.snapshot_base == tmp_path / "snap"  # where deletion looks for them
    # Deleting an image another collection also holds keeps its bytes; the last holder's deletion drops them.
    products.delete_image(in_products)
    assert _blob_count(engine) == 2
    default.delete_image(in_default)
    assert _blob_count(engine) == 1
    default.close()
    products.close()


def test_create_list_describe_delete_and_refusals(engine, registry, tmp_path):
    created = collections.create_collection(engine, "fashion", model_name="efficientnet_lite0")
    assert (created.name, created.schema, created.model_name) == ("fashion", "c_fashion", "efficientnet_lite0")
    assert [c.name for c in collections.list_collections(engine)] == ["default", "fashion"]
    with pytest.raises(CollectionExists):
        collections.create_collection(engine, "fashion")
    for bad in ("Fashion", "1st", "a-b", "x" * 41, "", "robert'); drop table images;--"):
        with pytest.raises(InvalidQuery, match="lowercase letters"):
            collections.create_collection(engine, bad)
    with pytest.raises(InvalidQuery, match="unknown model"):
        collections.create_collection(engine, "other", model_name="nope")
    with pytest.raises(InvalidQuery, match="cannot be deleted"):
        collections.delete_collection(engine, "default")
    # Its images' bytes go with it, unless the default collection holds them too.
    search = ImageSearch(registry.sessions("fashion"), PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    search.add_image(_colour((1, 2, 3)), "a")
    search.add_image(_colour((4, 5, 6)), "b")
    search.close()
    default = ImageSearch(registry.sessions("default"), PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    default.add_image(_colour((1, 2, 3)), "a")
    assert (tmp_path / "snap" / "collections" / "fashion").is_dir()
    registry.forget("fashion")
    elsewhere = CollectionSessions(engine).sessions("fashion")  # another process's connections to it
    with elsewhere() as s:
        assert s.scalar(sa.text("SELECT count(*) FROM images")) == 2
    collections.delete_collection(engine, "fashion", tmp_path / "snap")
    with pytest.raises(NotFound, match="c_fashion is gone"):  # not the default collection's images instead
        with elsewhere() as s:
            s.scalar(sa.text("SELECT count(*) FROM images"))
    assert _blob_count(engine) == 1 and not (tmp_path / "snap" / "collections" / "fashion").exists()
    assert [c.name for c in collections.list_collections(engine)] == ["default"]
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = 'c_fashion'")) == 0
    with pytest.raises(NotFound):
        collections.get_collection(engine, "fashion")
    assert len(default.search_similar(_colour((1, 2, 3))).results) == 1
    default.close()


def test_existing_data_migrates_into_the_default_collection_and_new_migrations_reach_every_collection(empty_db_url):
    engine = create_engine_checked(empty_db_url)
    migrate_schema(engine, "public", "0008")  # a database from before collections, with an image in it
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO images (sha256, data, width, height, format) "
                             "VALUES (:s, :d, 1, 1, 'PNG')"), {"s": "f" * 64, "d": b"old bytes"})
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name, schema FROM public.collections")).all() == [("default", "public")]
        assert bytes(conn.scalar(sa.text("SELECT data FROM public.image_blobs WHERE sha256 = :s"),
                                 {"s": "f" * 64})) == b"old bytes"
    registry = CollectionSessions(engine)
    with registry.sessions("default")() as s:
        image_id = s.scalar(sa.text("SELECT id FROM images"))
        assert image_store.get_image(s, image_id, with_data=True)[0].data == b"old bytes"
    collections.create_collection(engine, "later")
    with engine.connect() as conn:  # a collection's schema has every table and its own version, at head
        assert conn.scalar(sa.text("SELECT version_num FROM c_later.alembic_version")) == "0009"
        assert conn.scalar(sa.text("SELECT to_regclass('c_later.embeddings')")) is not None
    from backend.storage.migrations import downgrade

    downgrade(engine)  # down and up again: the collections go with the registry, and their names are free again
    migrate(engine)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = 'c_later'")) == 0
    collections.create_collection(engine, "later")
    engine.dispose()


@pytest.fixture
def client(folder_client, tmp_path):
    def open_collection(name, collection_sessions):
        return ImageSearch(collection_sessions, OtherPixels(), snapshot_dir=tmp_path / "snap")

    return folder_client(n_per_class=4, open_collection=open_collection)


def test_api_creates_serves_and_deletes_collections(client):
    listed = client.get("/collections").json()
    assert [(c["name"], c["served"]) for c in listed] == [("default", True)]
    assert client.post("/collections", json={"name": "Bad Name"}).status_code == 422
    assert client.post("/collections", json={"name": "ok", "description": "a\x00b"}).status_code == 422
    made = client.post("/collections", json={"name": "products", "description": "shop"})
    assert made.status_code == 201 and made.json()["served"] is False
    assert client.post("/collections", json={"name": "products"}).status_code == 409
    red = _colour((230, 20, 20))
    up = client.post("/upload?collection=products", files={"file": ("r.png", red, "image/png")},
                     data={"category": "warm"})
    assert up.status_code == 200, up.text
    up = up.json()
    assert up["image_url"] == f"/images/{up['image_id']}?collection=products"
    found = client.post("/search?collection=products", files={"file": ("q.png", red, "image/png")}).json()
    assert [(h["category"], h["image_url"]) for h in found["results"]] == [("warm", up["image_url"])]
    assert client.get(up["image_url"]).content == red
    # The default collection does not see it; its own search finds its folder images only.
    default = client.post("/search?limit=50", files={"file": ("q.png", red, "image/png")}).json()["results"]
    assert "warm" not in {h["category"] for h in default} and len(default) == 12
    detail = client.get("/collections/products").json()
    assert detail["images"] == 1 and detail["served"] and detail["model"] == "test-pixels-b"
    assert detail["memory_bytes"] > 0 and detail["index_vectors"] == 1
    status = client.get("/status?collection=products").json()
    assert status["collection"] == "products" and status["images"] == 1
    assert {c["name"]: c["index_vectors"] for c in status["served_collections"]} == {"default": 12, "products": 1}
    assert client.get("/categories?collection=nope").status_code == 404
    assert client.get("/categories?collection=NOPE").status_code == 422
    assert client.get("/collections/nope").status_code == 404
    spec = client.get("/openapi.json").json()
    assert "collection" in {p["name"] for p in spec["paths"]["/search"]["post"]["parameters"]}
    assert client.delete("/collections/products").status_code == 422  # confirm is required ...
    refused = client.delete("/collections/products?confirm=product")
    assert refused.status_code == 422 and "confirm=products" in refused.json()["detail"]  # ... and must match
    assert client.delete("/collections/default?confirm=default").status_code == 422
    assert client.delete("/collections/products?confirm=products").status_code == 204
    assert client.get("/categories?collection=products").status_code == 404
    assert [c["name"] for c in client.get("/collections").json()] == ["default"]
    assert client.get(up["image_url"]).status_code == 404


def test_a_collection_deleted_by_another_process_stops_being_served(client, engine):
    client.post("/collections", json={"name": "gone"})
    assert client.get("/categories?collection=gone").status_code == 200  # opened and served
    collections.delete_collection(engine, "gone")  # as another process would: the server learns by live sync
    deadline = time.monotonic() + 10
    while client.get("/categories?collection=gone").status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/categories?collection=gone").status_code == 404


def test_collections_past_the_served_maximum_or_idle_are_closed_and_open_again(client, monkeypatch):
    from backend.config import settings
    from backend.service import served

    monkeypatch.setattr(settings, "served_collections_max", 2)
    monkeypatch.setattr(served, "EVICTED_SECONDS", 0.0)

    def loaded():
        return [c["name"] for c in client.get("/status").json()["served_collections"]]

    for name in ("a", "b", "c"):
        assert client.post("/collections", json={"name": name}).status_code == 201
    for name in ("a", "b", "a", "c"):  # b is the least recently used when c opens
        assert client.get(f"/categories?collection={name}").status_code == 200
    assert loaded() == ["default", "a", "c"]
    assert client.get("/categories?collection=b").status_code == 200  # opened again: a goes now
    assert loaded() == ["default", "c", "b"]
    monkeypatch.setattr(settings, "served_idle_seconds", 0.2)
    monkeypatch.setattr(served, "SWEEP_SECONDS", 0.1)
    served_now = client.app.state.collections
    threading.Thread(target=served_now._sweep, daemon=True).start()  # the server's sweeper waits 10 s between looks
    deadline = time.monotonic() + 10
    while loaded() != ["default"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loaded() == ["default"]  # idle ones closed; the server's own stays
    assert client.get("/categories?collection=c").status_code == 200


@pytest.mark.slow
def test_cli_manages_collections_and_populates_one(cli_env, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=2)

    def run(*args, stdin=subprocess.DEVNULL):
        return subprocess.run([sys.executable, "-m", "backend", *args], env=cli_env, capture_output=True, text=True,
                              stdin=stdin, timeout=600)

    made = run("collections", "create", "shop", "--model", "efficientnet_lite0", "--description", "test shop")
    assert made.returncode == 0, made.stderr
    assert run("collections", "create", "shop").returncode == 2
    assert "lowercase letters" in run("collections", "create", "Shop").stderr
    filled = run("--collection", "shop", "populate", "--dataset", "folder", "--data-dir", str(tmp_path / "f"))
    assert filled.returncode == 0, filled.stderr
    listed = json.loads(run("collections", "list", "--json").stdout)
    assert [(c["name"], c["images"], c["model"]) for c in listed] == [("default", 0, None),
                                                                      ("shop", 6, "efficientnet_lite0")]
    described = run("collections", "describe", "shop")
    assert "shop: 6 images, 3 categories, model efficientnet_lite0" in described.stdout
    assert "images:     6" in run("--collection", "shop", "status").stdout
    refused = run("collections", "delete", "shop")  # nobody to confirm it
    assert refused.returncode == 2 and "--yes" in refused.stderr and "cannot be undone" in refused.stderr
    assert run("collections", "delete", "nope", "--yes").returncode == 2
    assert run("collections", "delete", "shop", "--yes").returncode == 0
    assert run("--collection", "shop", "status").returncode == 2
