"""The Python API and the index life cycle against a real PostgreSQL (stand-in embedder)."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from backend.errors import InvalidImage, NotFound
from backend.service.image_search import ImageSearch
from tests.helpers import CLASSES, PixelEmbedder, png_bytes, write_folder_dataset


@pytest.fixture
def collection(tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    return tmp_path / "f"


def _open(sessions, tmp_path, index_type="flatip"):
    return ImageSearch(sessions, PixelEmbedder(), index_type, snapshot_dir=tmp_path / "snap", batch_size=8)


def _colour(rgb, size=32):
    return png_bytes(Image.new("RGB", (size, size), rgb))


def test_build_and_search(sessions, tmp_path, collection):
    search = _open(sessions, tmp_path)
    assert search.index_source == "rebuilt" and len(search.index) == 0
    report = search.build_database("folder", collection, progress=False)
    assert report.added == 24 and len(search.index) == 24
    response = search.search_similar(_colour((10, 10, 230)), k=5, top_categories=1)
    assert [r.category for r in response.results] == ["blue"] * 5
    assert [r.rank for r in response.results] == [1, 2, 3, 4, 5]
    assert all(r.file_name.startswith("blue/") for r in response.results)
    assert [p["category"] for p in response.prototypes] == ["blue"]
    assert {"embedding", "search"} <= set(response.timings_ms)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    exhaustive = search.search_similar(_colour((10, 10, 230)), k=5, use_prototypes=False)
    assert exhaustive.prototypes == [] and len(exhaustive.results) == 5
    filtered = search.search_similar(_colour((10, 10, 230)), k=3, category="red", use_prototypes=False)
    assert [r.category for r in filtered.results] == ["red"] * 3
    with pytest.raises(NotFound, match="category 'purple' not found"):
        search.search_similar(_colour((1, 1, 1)), category="purple")
    ranking = search.rank_prototypes(_colour((10, 230, 10)), top_categories=3)
    assert [p["category"] for p in ranking.prototypes][0] == "green" and len(ranking.prototypes) == 3
    page = search.search_similar(_colour((10, 10, 230)), k=4, use_prototypes=False, offset=4, min_score=0.0)
    assert [r.image_id for r in page.results] == [r.image_id for r in search.search_similar(
        _colour((10, 10, 230)), k=8, use_prototypes=False).results][4:]
    assert (page.offset, page.next_offset, page.results[0].rank) == (4, 8, 5)
    with pytest.raises(ValueError, match="at most 1000"):
        search.search_similar(_colour((10, 10, 230)), k=10, offset=995)


def test_add_duplicate_new_category_and_delete(sessions, tmp_path, collection):
    search = _open(sessions, tmp_path)
    search.build_database("folder", collection, progress=False)
    added = search.add_image(_colour((240, 240, 10)), "yellow", original_name="y.png")
    assert not added.duplicate and added.image_id in search.index
    again = search.add_image(_colour((240, 240, 10)), "yellow")
    assert again == type(added)(added.image_id, True)
    hit = search.search_similar(_colour((240, 240, 10)), k=1, top_categories=1)
    assert hit.results[0].image_id == added.image_id and hit.results[0].category == "yellow"
    assert hit.results[0].score == pytest.approx(1.0, abs=1e-5)
    more = search.search_by_id(added.image_id, k=3, use_prototypes=False)
    assert added.image_id not in [r.image_id for r in more.results] and len(more.results) == 3
    search.delete_image(added.image_id)
    assert added.image_id not in search.index
    assert "yellow" not in [p["category"] for p in search.rank_prototypes(_colour((240, 240, 10)), 10).prototypes]
    with pytest.raises(NotFound):
        search.delete_image(added.image_id)
    with pytest.raises(InvalidImage):
        search.add_image(b"not an image", "yellow")
    with pytest.raises(NotFound):
        search.search_by_id(10**9)


def _all_results(search, queries):
    return [[(r.image_id, round(r.score, 5)) for r in search.search_vector(q, 10, top_categories=2).results]
            for q in queries]


def test_incremental_changes_equal_a_fresh_rebuild(sessions, tmp_path, collection):
    search = _open(sessions, tmp_path)
    search.build_database("folder", collection, progress=False)
    rng = np.random.default_rng(3)
    ids = search.index.ids().tolist()
    for image_id in rng.choice(ids, 6, replace=False).tolist():
        search.delete_image(image_id)
    for k in range(5):
        search.add_image(_colour(tuple(int(x) for x in rng.integers(0, 256, 3))), CLASSES[k % 3] if k < 4 else "new")
    queries = PixelEmbedder().embed([Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 256, 3)))
                                     for _ in range(10)])
    incremental = _all_results(search, queries)
    fresh = _open(sessions, tmp_path / "elsewhere")
    assert fresh.index_source == "rebuilt"
    assert _all_results(fresh, queries) == incremental
    assert fresh.index.categories == search.index.categories


def test_snapshot_is_used_when_it_matches_and_rebuilt_when_stale(sessions, tmp_path, collection, caplog):
    first = _open(sessions, tmp_path)
    first.build_database("folder", collection, progress=False)
    first.save_snapshot()
    caplog.set_level(logging.INFO, logger="backend.service.index_manager")
    second = _open(sessions, tmp_path)
    assert second.index_source == "snapshot" and "from snapshot" in caplog.text
    assert len(second.index) == len(first.index)
    first.add_image(_colour((1, 2, 3)), "red")  # the database moves on; the snapshot on disk does not
    third = _open(sessions, tmp_path)
    assert third.index_source == "rebuilt" and "snapshot is stale" in caplog.text
    assert len(third.index) == len(first.index)
    assert _open(sessions, tmp_path, "flatl2").index_source == "rebuilt"  # another index type: not this snapshot
    third.add_image(_colour((3, 2, 1)), "blue")
    third.close()  # changed since its snapshot: writes a fresh one
    assert _open(sessions, tmp_path).index_source == "snapshot"


def test_two_processes_see_each_others_changes_after_refresh(sessions, tmp_path, collection):
    a = _open(sessions, tmp_path / "a")
    b = _open(sessions, tmp_path / "b")
    a.build_database("folder", collection, progress=False)
    assert len(b.index) == 0
    assert b.refresh() == (24, 0) and len(b.index) == 24
    gone = b.index.ids()[0]
    b.delete_image(int(gone))
    assert a.refresh() == (0, 1) and gone not in a.index
    assert a.refresh() == (0, 0)  # nothing new: cheap no-op
    query = PixelEmbedder().embed([Image.new("RGB", (32, 32), (200, 30, 30))])
    assert _all_results(a, query) == _all_results(b, query)


def test_add_image_stores_metadata_with_the_image(sessions, tmp_path):
    from backend.storage import images as image_store

    search = _open(sessions, tmp_path)
    added = search.add_image(_colour((9, 99, 199)), "teal", metadata={"photographer": "ada"})
    with sessions() as s:
        image, category = image_store.get_image(s, added.image_id)
    assert image.metadata_ == {"photographer": "ada"} and category == "teal"
    again = search.add_image(_colour((9, 99, 199)), "teal", metadata={"photographer": "bob"})
    assert again.duplicate
    with sessions() as s:
        assert image_store.get_image(s, added.image_id)[0].metadata_ == {"photographer": "ada"}  # a duplicate changes nothing


def test_a_search_decodes_its_query_once_and_records_its_thumbnail(sessions, tmp_path, collection, monkeypatch):
    from backend.service import image_search, search_history
    from backend.storage.tables import SearchRecord

    search = _open(sessions, tmp_path)
    search.build_database("folder", collection, progress=False)
    search.start_history(30)
    decodes = []
    for module in (image_search, search_history):  # the search's decode, and the one the history had of its own
        monkeypatch.setattr(module, "decode", lambda data, real=module.decode: decodes.append(1) or real(data))
    search.search_similar(_colour((10, 10, 230)), k=3)
    search.history.flush()
    assert len(decodes) == 1
    with sessions() as s:
        thumbnail = s.scalar(SearchRecord.__table__.select().with_only_columns(SearchRecord.query_thumbnail))
    assert Image.open(io.BytesIO(thumbnail)).getpixel((0, 0))[2] > 200  # the blue query's
    search.close()
