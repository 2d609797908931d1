"""Near-duplicates: groups found with the index, decisions kept in PostgreSQL, collapsed results; Python API, REST API
and the command line (real PostgreSQL)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.config import settings
from backend.errors import InvalidQuery
from backend.service.image_search import ImageSearch
from backend.storage.filters import Condition
from tests.helpers import ROOT, PixelEmbedder, png_bytes

THRESHOLD = 0.99  # the stand-in embedder's 4x4 colours: copies of one picture agree to 0.999


def _picture(seed: int) -> Image.Image:
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((64, 64), Image.Resampling.NEAREST)


def _copies(picture: Image.Image) -> list[bytes]:
    """The picture, re-encoded as JPEG, and resized."""
    return [png_bytes(picture), png_bytes(picture, "JPEG", quality=80), png_bytes(picture.resize((48, 48)))]


@pytest.fixture
def collection(sessions, tmp_path):
    """Six distinct pictures, two of them stored with two copies each; returns (search, [ids of each copied
    picture's three images])."""
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    copied = []
    for seed in range(6):
        stored = [search.add_image(data, f"c{seed % 2}", original_name=f"p{seed}-{n}").image_id
                  for n, data in enumerate(_copies(_picture(seed)) if seed < 2 else [png_bytes(_picture(seed))])]
        if seed < 2:
            copied.append(sorted(stored))
    return search, copied


def test_groups_decisions_persist_and_keep_one_deletes(collection, sessions, tmp_path):
    search, copied = collection
    groups = search.duplicate_groups(THRESHOLD)
    assert sorted([h.image_id for h in g] for g in groups) == sorted(copied)
    assert all(THRESHOLD <= h.score <= 1.0 for g in groups for h in g)
    assert search.decide_duplicates(copied[0], "not_duplicates") == 3  # three pairs
    again = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap2")  # another process, later
    assert [[h.image_id for h in g] for g in again.duplicate_groups(THRESHOLD)] == [copied[1]]
    assert again.decide_duplicates(copied[1], "keep_one", keep=copied[1][0]) == 2
    assert again.duplicate_groups(THRESHOLD) == [] and len(again.index) == 8
    assert copied[1][1] not in again.index
    with pytest.raises(InvalidQuery, match="keep"):
        again.decide_duplicates(copied[0], "keep_one", keep=None)
    with pytest.raises(InvalidQuery):
        again.decide_duplicates(copied[0], "merge")
    with pytest.raises(InvalidQuery, match="2 to"):
        again.decide_duplicates([copied[0][0]], "keep_all")


def test_a_search_can_collapse_near_duplicates(collection):
    search, copied = collection
    query = png_bytes(_picture(0))
    plain = [r.image_id for r in search.search_similar(query, k=4, use_prototypes=False).results]
    assert set(plain[:3]) == set(copied[0])  # the picture and its two copies first
    collapsed = [r.image_id for r in search.search_similar(query, k=4, use_prototypes=False, collapse=THRESHOLD)
                 .results]
    assert len(collapsed) == 4 and len(set(collapsed) & set(copied[0])) == 1 and collapsed[0] == plain[0]
    # Nothing left to collapse (the fuzzer's find: a reshape of no vectors was a 500)
    assert search.search_similar(query, k=4, use_prototypes=False, collapse=THRESHOLD, min_score=1.01).results == []
    assert search.search_similar(query, k=4, collapse=THRESHOLD, where=[Condition("no such key", "eq", "x")]).results == []


def test_duplicates_over_the_api(collection, sessions, tmp_path, monkeypatch):
    _, copied = collection
    monkeypatch.setattr(settings, "open_writes", True)
    app = create_app(lambda: ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "api"))
    with TestClient(app, base_url="http://localhost") as client:
        groups = client.get(f"/duplicates?threshold={THRESHOLD}").json()
        assert sorted([h["image_id"] for h in g["images"]] for g in groups) == sorted(copied)
        assert all(h["image_url"] == f"/images/{h['image_id']}" for g in groups for h in g["images"])
        decided = client.post("/duplicates/decisions", json={"image_ids": copied[0], "decision": "keep_all"})
        assert decided.json() == {"decision": "keep_all", "changed": 3}
        assert len(client.get(f"/duplicates?threshold={THRESHOLD}").json()) == 1
        for bad in ({"image_ids": copied[1], "decision": "keep_one"}, {"image_ids": copied[1], "decision": "merge"},
                    {"image_ids": [1], "decision": "keep_all"}):
            response = client.post("/duplicates/decisions", json=bad)
            assert response.status_code == 422 and response.json()["detail"], bad
        assert client.get("/duplicates?threshold=0.2").status_code == 422
        unknown = client.post("/duplicates/decisions", json={"image_ids": [copied[1][0], 10**12],
                                                             "decision": "keep_all"})
        assert unknown.status_code == 404 and "not found" in unknown.json()["detail"]
        query = {"file": ("q.png", png_bytes(_picture(1)), "image/png")}
        hits = client.post("/search?use_prototypes=false&limit=3&collapse_duplicates=true", files=query).json()
        assert len({h["image_id"] for h in hits["results"]} & set(copied[1])) == 1


@pytest.mark.slow
def test_duplicates_command(cli_env, tmp_path):
    folder = tmp_path / "photos" / "all"
    folder.mkdir(parents=True)
    from skimage import data

    photo = Image.fromarray(data.coffee())
    (folder / "coffee.png").write_bytes(png_bytes(photo))
    (folder / "coffee-small.jpg").write_bytes(png_bytes(photo.resize((480, 320)), "JPEG", quality=95))
    (folder / "rocket.png").write_bytes(png_bytes(Image.fromarray(data.rocket())))
    run = lambda *a: subprocess.run([sys.executable, "-m", "backend", *a], cwd=ROOT, env=cli_env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    assert run("populate", "--dataset", "folder", "--data-dir", str(tmp_path / "photos")).returncode == 0
    listed = run("duplicates", "--json")
    assert listed.returncode == 0, listed.stderr
    groups = json.loads(listed.stdout)
    assert [sorted(h["file_name"] for h in g) for g in groups] == [["all/coffee-small.jpg", "all/coffee.png"]]
    assert run("duplicates", "--threshold", "2").returncode == 2


def test_a_group_joined_through_a_third_image_scores_every_member():
    """a~b and b~c but not a~c: c's score is its similarity to b, not a missing one."""
    from backend.search.duplicates import groups

    pairs = {(1, 2): 0.95, (2, 3): 0.93}
    assert groups(pairs, set()) == [[1, 2, 3]]
    assert groups(pairs, {(1, 2)}) == [[2, 3]]
