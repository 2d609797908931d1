"""Rules that live in one place and once drifted apart: a collection's snapshot folder, the model a command treats
as current, the search defaults of every entry point, one populate behind the CLI and the Python API."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.config import settings
from backend.search.category_index import CategoryIndex
from backend.service.image_search import ImageSearch
from backend.service.requests import SearchRequest
from backend.service.model_choice import choose_model
from backend.storage import images as image_store
from backend.storage.collections import CollectionSessions, create_collection
from backend.storage.tables import Category, Embedding
from tests.helpers import PixelEmbedder, folder_opener, write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]


def _run(env, *args):
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _store_vectors(sessions, models: dict[str, int], n: int = 6, chosen: str | None = None, first: int = 0) -> None:
    """n images (ids from `first` in their digests) in two categories with random unit vectors of each model."""
    rng = np.random.default_rng(first)
    with sessions() as s, s.begin():
        new = [image_store.NewImage(sha256=f"{i:064x}", data=b"x", width=1, height=1, format="PNG",
                                    category=f"c{i % 2}") for i in range(first, first + n)]
        ids = image_store.insert_images(s, new)
        for model, dim in models.items():
            image_store.ensure_model(s, model, dim, chosen=model == chosen)
            vectors = rng.normal(size=(n, dim)).astype(np.float32)
            image_store.insert_embeddings(s, model, [ids[im.sha256] for im in new],
                                          vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


@pytest.mark.slow
def test_check_after_rebuild_of_another_collection_looks_in_that_collections_snapshots(cli_env, engine, sessions):
    _store_vectors(sessions, {"efficientnet_lite0": 1280}, n=4, first=100)  # the default collection, snapshotted
    assert _run(cli_env, "rebuild").returncode == 0
    create_collection(engine, "second")
    registry = CollectionSessions(engine)
    _store_vectors(registry.sessions("second"), {"efficientnet_lite0": 1280})
    rebuilt = _run(cli_env, "--collection", "second", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    checked = _run(cli_env, "--collection", "second", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "snapshot" in checked.stdout


@pytest.mark.slow
def test_drop_model_refuses_the_model_that_model_name_makes_current(cli_env, sessions):
    _store_vectors(sessions, {"efficientnet_lite2": 1280, "efficientnet_lite0": 1280}, chosen="efficientnet_lite2")
    env = {**cli_env, "MODEL_NAME": "efficientnet_lite0"}
    refused = _run(env, "drop-model", "efficientnet_lite0", "--yes")
    assert refused.returncode == 2 and "MODEL_NAME" in refused.stderr, refused.stderr
    with sessions() as s:
        kept = s.scalar(sa.select(sa.func.count()).select_from(Embedding)
                        .where(Embedding.model_name == "efficientnet_lite0"))
    assert kept == 6


def test_examples_search_follows_the_configured_search_defaults(sessions, tmp_path, monkeypatch):
    opener = folder_opener(sessions, tmp_path, n_per_class=4)
    monkeypatch.setattr(settings, "default_search_limit", 3)
    monkeypatch.setattr(settings, "prototype_limit", 1)
    with TestClient(create_app(opener)) as client:
        body = client.post("/search/examples", json={"positive_ids": [1]}).json()
        assert len(body["results"]) == 3  # DEFAULT_SEARCH_LIMIT, not 10
        assert len(body["prototypes"]) == 1  # PROTOTYPE_LIMIT, not 3
        monkeypatch.setattr(settings, "use_prototype_filtering", False)
        assert client.post("/search/examples", json={"positive_ids": [1]}).json()["use_prototypes"] is False


def test_python_api_searches_take_the_same_defaults(sessions, tmp_path, monkeypatch):
    search = folder_opener(sessions, tmp_path, n_per_class=4)()
    try:
        monkeypatch.setattr(settings, "default_search_limit", 2)
        assert len(search.search_by_id(1).results) == 2
        assert len(search.search_by_id(1, k=5).results) == 5
    finally:
        search.close()


def test_a_compressed_index_re_scores_as_many_candidates_as_compressed_rerank_says(sessions, tmp_path, monkeypatch):
    search = folder_opener(sessions, tmp_path, n_per_class=4)()
    asked = []
    real = CategoryIndex.search
    monkeypatch.setattr(CategoryIndex, "search",
                        lambda self, *a, **k: asked.append(k.get("rerank")) or real(self, *a, **k))
    try:
        monkeypatch.setattr(settings, "compressed_rerank", 5)
        search.search_by_id(1)
        search.search_by_id(1, request=SearchRequest(rerank=2))
        assert asked[0] == 5 and asked[-1] == 2
        with pytest.raises(ValueError, match="rerank"):
            SearchRequest(rerank=0)
    finally:
        search.close()


def test_build_database_is_the_populate_of_the_command_line(sessions, tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / "f", n_per_class=4)
    monkeypatch.setattr(settings, "model_name", None)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    try:
        report = search.build_database("folder", tmp_path / "f", progress=False, categories="auto:2")
        assert len(report.image_ids) == 12
        with sessions() as s:
            names = set(s.scalars(sa.select(Category.name)))
        assert names == {"cluster 1", "cluster 2"}  # automatic categories, as populate --categories auto:2 makes
        assert len(search.index) == 12 and len(search.index.categories) == 2
    finally:
        search.close()
    choice = choose_model(sessions, quiet=True)  # the model it populated with is the collection's choice now
    assert choice.name == PixelEmbedder.name and choice.source == "database"
