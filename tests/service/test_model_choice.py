"""Which model a command uses when MODEL_NAME is unset, and what it says when the model and the vectors disagree."""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.config import settings
from backend.embedding import models
from backend.embedding.decode import sha256
from backend.errors import DatabaseError, ModelUnavailable
from backend.service.image_search import ImageSearch
from backend.service.model_choice import ModelChoice, choose_model, load_embedder, unserved_notice
from backend.storage import images as image_store
from backend.storage.engine import normalise_url
from tests.helpers import PixelEmbedder, write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]


def _store_vectors(sessions, model: str, n: int, chosen: bool, offset: int = 0) -> None:
    rng = np.random.default_rng(offset)
    with sessions() as s, s.begin():
        image_store.ensure_model(s, model, 4, chosen=chosen)
        ids = image_store.insert_images(s, [image_store.NewImage(sha256=sha256(f"{model}{offset + k}".encode()), data=b"x", width=1,
                                                     height=1, format="PNG", category="c") for k in range(n)])
        image_store.insert_embeddings(s, model, list(ids.values()), rng.random((n, 4), dtype=np.float32))


@pytest.fixture
def unset_model(monkeypatch):
    monkeypatch.setattr(settings, "model_name", None)


def test_model_name_wins_when_set(sessions, monkeypatch):
    _store_vectors(sessions, "a", 3, chosen=True)
    monkeypatch.setattr(settings, "model_name", "efficientnet_lite2")
    assert choose_model(sessions) == ModelChoice("efficientnet_lite2", "MODEL_NAME", "set by MODEL_NAME")


def test_unset_uses_the_model_a_populate_chose_last_else_the_one_with_most_vectors(sessions, unset_model):
    _store_vectors(sessions, "many", 5, chosen=False)
    _store_vectors(sessions, "few", 2, chosen=False, offset=10)
    assert choose_model(sessions).name == "many"
    _store_vectors(sessions, "few", 1, chosen=True, offset=20)
    choice = choose_model(sessions)
    assert (choice.name, choice.source) == ("few", "database")
    assert "the 3 few vectors in the database" in choice.reason


def test_empty_database_uses_the_default_when_its_weights_can_be_had_else_an_offline_model(sessions, unset_model,
                                                                                          monkeypatch, caplog):
    resnet = models.get_embedder(models.DEFAULT_MODEL)
    monkeypatch.setattr(resnet, "weights_problem", lambda: None)
    assert choose_model(sessions).source == "default"
    monkeypatch.setattr(resnet, "weights_problem", lambda: "no weights here")
    with caplog.at_level(logging.INFO, logger="backend.service.model_choice"):
        choice = choose_model(sessions)
    assert choice.name == "efficientnet_lite0" and choice.source == "offline fallback"
    assert "resnet50 cannot be used here (no weights here)" in caplog.text


def test_resnet_weights_problem_names_a_missing_weights_file(tmp_path):
    model = models.create_embedder("resnet18", weights_path=tmp_path / "missing.pth")
    assert "does not exist" in model.weights_problem()
    assert models.create_embedder("efficientnet_lite0").weights_problem() is None


def test_a_model_that_cannot_load_says_which_models_the_database_has(sessions, monkeypatch):
    _store_vectors(sessions, "efficientnet_lite0", 3, chosen=True)
    monkeypatch.setattr(settings, "model_name", "resnet18")
    monkeypatch.setattr(settings, "model_weights_path", Path("/nonexistent/resnet18.pth"))
    models.get_embedder.cache_clear()
    try:
        with pytest.raises(ModelUnavailable) as err:
            load_embedder(choose_model(sessions), sessions)
    finally:
        models.get_embedder.cache_clear()
    message = str(err.value)
    assert "MODEL_WEIGHTS_PATH=/nonexistent/resnet18.pth does not exist" in message
    assert "efficientnet_lite0 (3 vectors; works offline)" in message
    assert "unset MODEL_NAME" in message and "MODEL_NAME=efficientnet_lite0" in message


def test_unserved_notice():
    assert unserved_notice({"a": 3}, "a") is None
    assert unserved_notice({}, "a") is None
    notice = unserved_notice({"b": 3, "c": 7}, "a")
    assert "no a vectors" in notice and notice.index("c (7 vectors") < notice.index("b (3 vectors")
    assert "MODEL_NAME=c" in notice


class OtherPixels(PixelEmbedder):
    name = "other-pixels"


def test_server_with_a_model_that_has_no_vectors_does_not_claim_ready_and_says_which_models_do(sessions, tmp_path,
                                                                                               caplog):
    write_folder_dataset(tmp_path / "f", n_per_class=2)
    ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap").build_database(
        "folder", tmp_path / "f", progress=False)
    with caplog.at_level(logging.INFO, logger="backend.api.app"), \
            TestClient(create_app(lambda: ImageSearch(sessions, OtherPixels(), snapshot_dir=tmp_path / "snap"))) as c:
        status = c.get("/status").json()
    assert status["index_size"] == 0 and "test-pixels (6 vectors)" in status["notice"]
    assert "serving 0 images: the database holds no other-pixels vectors" in caplog.text
    assert "ready:" not in caplog.text


@pytest.mark.parametrize("url, driver", [
    ("postgresql://u:p@h:5432/d", "postgresql+psycopg2"),
    ("postgres://u:p@h/d", "postgresql+psycopg2"),
    ("postgresql+psycopg2://u@h/d", "postgresql+psycopg2"),
    ("postgresql+psycopg://u@h/d", "postgresql+psycopg2"),  # psycopg 3 is not installed
])
def test_usual_database_urls_are_normalised_to_the_installed_driver(url, driver):
    assert normalise_url(url).split("://")[0] == driver
    assert normalise_url(url).split("://")[1] == url.split("://")[1]


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/d", "postgresql+asyncpg://u@h/d"])
def test_unusable_database_urls_are_refused_in_words(url):
    with pytest.raises(DatabaseError):
        normalise_url(url)


@pytest.mark.slow
def test_cli_accepts_the_plain_scheme_and_reports_an_unreachable_server_in_one_line(cli_env):
    plain = cli_env["DATABASE_URL"].replace("postgresql+psycopg2://", "postgresql://")
    proc = subprocess.run([sys.executable, "-m", "backend", "status"], cwd=ROOT, env={**cli_env, "DATABASE_URL": plain},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "images:     0" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "backend", "status"], cwd=ROOT, timeout=120, capture_output=True,
                          text=True, env={**cli_env, "DATABASE_URL": "postgres://u:p@127.0.0.1:1/nothing"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot connect to PostgreSQL at")
    assert "Traceback" not in proc.stderr
