"""Changing a collection's model without downtime, against the real PostgreSQL: re-embed while searches go on,
switch every serving process atomically, switch back, drop the old vectors; a killed re-embed resumes."""
import subprocess
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from backend.api.app import create_app
from backend.config import settings
from backend.errors import ImsrcError
from backend.pipeline.reembed import ModelNotReady, coverage, drop_model, reembed, switch_model
from backend.service.image_search import ImageSearch
from backend.storage.collections import recorded_model
from tests.helpers import ROOT, PixelEmbedder, png_bytes, write_folder_dataset


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class SquaredPixels(PixelEmbedder):
    """A second stand-in model: squared average colours, so its scores differ from PixelEmbedder's."""

    name = "test-squares"

    def _load(self):
        model, head, preprocess = super()._load()
        return nn.Sequential(model, _Square()), head, preprocess


MODELS = {PixelEmbedder.name: PixelEmbedder, SquaredPixels.name: SquaredPixels}
QUERY = png_bytes(Image.new("RGB", (32, 32), (200, 60, 40)))


def _scores(response) -> list[tuple[int, float]]:
    return [(h["image_id"], round(h["score"], 4)) for h in response["results"]]


@pytest.fixture
def collection(sessions, tmp_path):
    """The default collection: 12 folder images with test-pixels vectors."""
    write_folder_dataset(tmp_path / "f", n_per_class=4)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    search.build_database("folder", tmp_path / "f", progress=False)
    search.close()
    return sessions


def _expected(sessions, embedder, directory) -> list[tuple[int, float]]:
    search = ImageSearch(sessions, embedder, snapshot_dir=directory)
    try:
        return _scores(search.search_similar(QUERY, k=5).to_dict())
    finally:
        search.close()


def test_searches_answer_throughout_a_reembed_and_the_switches(collection, tmp_path, monkeypatch):
    sessions = collection
    monkeypatch.setattr(settings, "open_writes", True)

    def open_collection(name, collection_sessions):  # as ImageSearch.open does: the collection's recorded model
        with collection_sessions() as s:
            model = recorded_model(s) or PixelEmbedder.name
        return ImageSearch(collection_sessions, MODELS[model](), snapshot_dir=tmp_path / "snap")

    old = _expected(sessions, PixelEmbedder(), tmp_path / "check")
    answers, stop = [], threading.Event()
    with TestClient(create_app(lambda: open_collection("default", sessions), open_collection),
                    base_url="http://localhost") as client:
        def keep_searching():
            while not stop.is_set():
                r = client.post("/search?limit=5", files={"file": ("q.png", QUERY, "image/png")})
                answers.append((time.monotonic(), r.status_code, _scores(r.json()) if r.status_code == 200 else r.text))

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            report = reembed(sessions, SquaredPixels(), batch_size=4, progress=False)
            assert report.embedded_existing == 12 and report.added == 0
            during = len(answers)
            new = _expected(sessions, SquaredPixels(), tmp_path / "check2")
            assert new != old
            with sessions() as s:
                assert coverage(s, SquaredPixels.name).complete
            switched = client.post("/collections/default/model", json={"model": SquaredPixels.name})
            assert switched.status_code == 200, switched.text
            assert switched.json() == {"collection": "default", "model": SquaredPixels.name,
                                       "previous": PixelEmbedder.name}
            deadline = time.monotonic() + 30
            while client.get("/status").json()["model"] != SquaredPixels.name and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # a few searches with the new model
            assert client.get("/status").json()["model"] == SquaredPixels.name
            back = client.post("/collections/default/model", json={"model": PixelEmbedder.name})
            assert back.status_code == 200 and back.json()["previous"] == SquaredPixels.name
            deadline = time.monotonic() + 30
            while client.get("/status").json()["model"] != PixelEmbedder.name and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            searcher.join()
    assert during > 0 and all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    results = [scores for _, _, scores in answers]
    assert all(r in (old, new) for r in results)  # each search ran on one model and its own index, never a mix
    assert all(r == old for r in results[:during])  # the re-embed changed nothing searches see
    switched_at = results.index(new)
    back_at = switched_at + results[switched_at:].index(old)
    assert all(r == new for r in results[switched_at:back_at]) and all(r == old for r in results[back_at:])
    assert back_at - switched_at >= 2


def test_a_killed_reembed_resumes_and_the_switch_waits_for_it(collection):
    sessions = collection
    with pytest.raises(KeyboardInterrupt):
        reembed(sessions, SquaredPixels(fail_after_batches=1), batch_size=4, progress=False)
    with sessions() as s:
        done = coverage(s, SquaredPixels.name).embedded
    assert done < 12
    if done:  # a batch stored before the interruption: switching now is refused
        with pytest.raises(ModelNotReady, match=f"{done} of 12 images"):
            with sessions() as s, s.begin():
                switch_model(s, SquaredPixels.name)
    report = reembed(sessions, SquaredPixels(), batch_size=4, progress=False)
    assert report.embedded_existing == 12 - done  # only what was missing
    with sessions() as s, s.begin():
        assert coverage(s, SquaredPixels.name).complete
        assert switch_model(s, SquaredPixels.name) is None
    with sessions() as s, s.begin():
        with pytest.raises(ImsrcError, match="switch to another"):
            drop_model(s, SquaredPixels.name)
        assert drop_model(s, PixelEmbedder.name) == 12
    with sessions() as s:
        assert coverage(s, PixelEmbedder.name).embedded == 0 and recorded_model(s) == SquaredPixels.name


@pytest.mark.slow
def test_cli_reembeds_switches_and_drops(cli_env, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=2)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=cli_env, capture_output=True,
                              text=True, timeout=600)

    assert run("populate", "--dataset", "folder", "--data-dir", str(tmp_path / "f")).returncode == 0
    refused = run("switch-model", "efficientnet_lite2")
    assert refused.returncode == 2 and "reembed --model efficientnet_lite2" in refused.stderr
    started = time.perf_counter()
    done = run("reembed", "--model", "efficientnet_lite2")
    assert done.returncode == 0, done.stderr
    assert "efficientnet_lite2: 6 of 6 images (100%)" in done.stdout
    assert time.perf_counter() - started < 300
    switched = run("switch-model", "efficientnet_lite2")
    assert switched.returncode == 0 and "from efficientnet_lite0 to efficientnet_lite2" in switched.stdout
    assert "model:      efficientnet_lite2" in run("status").stdout
    assert run("drop-model", "efficientnet_lite2").returncode == 2
    dropped = run("drop-model", "efficientnet_lite0", "--yes")
    assert dropped.returncode == 0 and "6 efficientnet_lite0 vectors" in dropped.stdout
