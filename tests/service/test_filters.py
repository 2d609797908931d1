"""Metadata filters: parsing, and filtered searches against brute force on the filtered set (real PostgreSQL)."""
import numpy as np
import pytest
import sqlalchemy as sa

from backend.service.image_search import ImageSearch
from backend.storage import filters
from backend.storage import images as image_store
from backend.storage.filters import Condition, InvalidFilter, from_json, from_query
from tests.helpers import PixelEmbedder

pytestmark = pytest.mark.xdist_group("filters")  # its module-scoped fixtures are built once

N_IMAGES, N_CATEGORIES, DIM = 3000, 6, PixelEmbedder.dim


def _metadata(i: int) -> dict:
    meta = {"n": i, "shard": i % 100, "colour": ["red", "green", "blue"][i % 3], "year": 1990 + i % 30}
    if i % 7 == 0:
        meta["signed"] = True
    if i % 11 == 0:
        meta["year"] = str(1990 + i % 30)  # text where others have numbers: a range never matches it
    return meta


def _fill(sessions, snapshots):
    """N_IMAGES stored images with random unit vectors and metadata; returns (open(index_type), ids, vectors,
    categories, metadata)."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((N_IMAGES, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cats = rng.integers(0, N_CATEGORIES, N_IMAGES)
    with sessions() as s, s.begin():
        image_store.ensure_model(s, PixelEmbedder.name, DIM)
        new = [image_store.NewImage(sha256=f"{i:064x}", data=b"-", width=1, height=1, format="PNG", category=f"c{cats[i]}",
                              metadata=_metadata(i)) for i in range(N_IMAGES)]
        by_sha = image_store.insert_images(s, new)
        ids = np.array([by_sha[im.sha256] for im in new], np.int64)
        image_store.insert_embeddings(s, PixelEmbedder.name, ids.tolist(), vectors)

    def open_search(index_type="flatip"):
        return ImageSearch(sessions, PixelEmbedder(), index_type, snapshot_dir=snapshots(index_type))
    return open_search, ids, vectors, cats, [_metadata(i) for i in range(N_IMAGES)]


@pytest.fixture
def random_collection(sessions, tmp_path):
    """_fill's collection, for a test that changes it."""
    return _fill(sessions, lambda index_type: tmp_path / index_type)


@pytest.fixture(scope="module")
def read_only_collection(module_sessions, tmp_path_factory):
    """_fill's collection, built once per module, for tests that only read it."""
    return _fill(module_sessions, tmp_path_factory.mktemp)


def _holds(meta: dict, c: Condition) -> bool:
    """The filter semantics, written out plainly: what the SQL must agree with."""
    if c.op == "exists":
        return (c.key in meta) == c.value
    if c.key not in meta:
        return False
    value = meta[c.key]
    if c.op in ("eq", "in"):
        options = c.value if c.op == "in" else (c.value,)
        return any(type(value) is type(o) and value == o for o in options)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return {"gt": value > c.value, "gte": value >= c.value, "lt": value < c.value, "lte": value <= c.value}[c.op]


def _brute_force(query, vectors, ids, keep, k):
    scores = vectors[keep] @ query
    order = np.lexsort((ids[keep], -scores))[:k]
    return ids[keep][order].tolist(), scores[order]


FILTERS = {
    "1% (one shard)": {"shard": 42},
    "one colour, a year range": {"colour": "blue", "year": {"gte": 2000, "lt": 2010}},
    "in, exists": {"shard": {"in": [1, 2, 3, 5, 8]}, "signed": {"exists": True}},
    "missing key": {"signed": {"exists": False}, "year": {"lte": 1995}},
    "most of the collection": {"year": {"gt": 1990}},
}


@pytest.mark.parametrize("prefilter", [True, False], ids=["pre-filter", "post-filter"])
def test_filtered_search_is_exact_against_brute_force(read_only_collection, monkeypatch, prefilter):
    open_search, ids, vectors, cats, metas = read_only_collection
    if not prefilter:  # every filter here then matches more than the pre-filter takes
        monkeypatch.setattr(filters, "PREFILTER_MAX_IDS", 20)
    search = open_search()
    rng = np.random.default_rng(1)
    for name, spec in FILTERS.items():
        conditions = from_json(spec)
        keep = np.array([all(_holds(m, c) for c in conditions) for m in metas])
        assert keep.any(), name
        for _ in range(5):
            query = rng.standard_normal(DIM).astype(np.float32)
            query /= np.linalg.norm(query)
            expected, scores = _brute_force(query, vectors, ids, keep, 25)
            got = search.search_vector(query, 25, use_prototypes=False, where=conditions)
            assert [r.image_id for r in got.results] == expected, name
            np.testing.assert_allclose([r.score for r in got.results], scores, atol=1e-5)
            second = search.search_vector(query, 10, use_prototypes=False, where=conditions, offset=10)
            assert [r.image_id for r in second.results] == expected[10:20], name
    one_percent = np.array([m["shard"] == 42 for m in metas])
    assert one_percent.sum() == N_IMAGES // 100


@pytest.mark.parametrize("prefilter", [True, False], ids=["pre-filter", "post-filter"])
def test_filter_combines_with_category_and_stage_one_ranks_only_matching_categories(read_only_collection, monkeypatch,
                                                                                     prefilter):
    open_search, ids, vectors, cats, metas = read_only_collection
    if not prefilter:
        monkeypatch.setattr(filters, "PREFILTER_MAX_IDS", 2)
    search = open_search()
    query = vectors[0]
    blue_c2 = [i for i, m, c in zip(ids.tolist(), metas, cats) if m["colour"] == "blue" and c == 2]
    got = search.search_vector(query, 10, use_prototypes=False, category="c2", where=from_json({"colour": "blue"}))
    assert {r.image_id for r in got.results} <= set(blue_c2) and len(got.results) == 10
    # Only images of one category match: two-stage search still finds them, whatever stage 1 thinks of the query.
    only = np.flatnonzero(cats == 4)[:3]
    conditions = from_json({"n": {"in": only.tolist()}})
    two_stage = search.search_vector(-vectors[only[0]], 10, top_categories=1, where=conditions)
    assert [p["category"] for p in two_stage.prototypes] == ["c4"]
    assert sorted(r.image_id for r in two_stage.results) == sorted(ids[only].tolist())


@pytest.mark.parametrize("index_type", ["hnsw", "ivfflat", "rabitq"])
def test_a_selective_filter_is_exact_on_the_approximate_index_types(read_only_collection, index_type, monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 100)  # categories of ~500 get an inverted file
    open_search, ids, vectors, cats, metas = read_only_collection
    search = open_search(index_type)
    keep = np.array([m["shard"] == 42 for m in metas])
    for q in range(5):
        expected, _ = _brute_force(vectors[q], vectors, ids, keep, 20)
        got = search.search_vector(vectors[q], 20, use_prototypes=False, where=from_json({"shard": 42}))
        assert [r.image_id for r in got.results] == expected


def test_query_string_syntax():
    assert from_query(["colour:red"]) == [Condition("colour", "in", ("red",))]
    assert from_query(["year:2001"]) == [Condition("year", "in", ("2001", 2001))]
    assert from_query(["signed:true", "tag:eq:in:x"]) == [Condition("signed", "in", ("true", True)),
                                                          Condition("tag", "in", ("in:x",))]
    assert from_query(["colour:in:red,blue", "year:gte:2000", "year:lt:2010.5", "signed:exists", "x:missing"]) == [
        Condition("colour", "in", ("red", "blue")), Condition("year", "gte", 2000), Condition("year", "lt", 2010.5),
        Condition("signed", "exists", True), Condition("x", "exists", False)]
    for bad in ["nocolon", ":red", "year:gte:soon", "year:lt:nan", "k:in:" + ",".join("a" * 101)]:
        with pytest.raises(InvalidFilter):
            from_query([bad])
    with pytest.raises(InvalidFilter, match="at most 20"):
        from_query([f"k{i}:v" for i in range(21)])


def test_json_syntax_refuses_what_it_cannot_use():
    assert from_json({"a": 1, "b": {"in": ["x", 2]}, "c": {"exists": False}, "d": {"gt": 1, "lte": 5}}) == [
        Condition("a", "eq", 1), Condition("b", "in", ("x", 2)), Condition("c", "exists", False),
        Condition("d", "gt", 1), Condition("d", "lte", 5)]
    for bad in [[1], {"a": {"like": "x"}}, {"a": {}}, {"a": {"in": []}}, {"a": {"in": "x"}}, {"a": {"gt": "x"}},
                {"a": {"exists": 1}}, {"a": [1, 2]}, {"a": {"eq": {"x": 1}}}, {"": 1}, {"a\x00": 1},
                {"a": "x" * 501}, {"a": {"gt": True}}]:
        with pytest.raises(InvalidFilter):
            from_json(bad)


def test_metadata_keys_summary(read_only_collection, module_sessions):
    with module_sessions() as s:
        summary = {k["key"]: k for k in filters.summarise_keys(s)}
    assert set(summary) == {"n", "shard", "colour", "year", "signed"}
    assert summary["colour"]["images"] == N_IMAGES and summary["colour"]["types"] == ["string"]
    assert [v["value"] for v in summary["colour"]["values"]] == ["blue", "green", "red"]
    assert sum(v["images"] for v in summary["colour"]["values"]) == N_IMAGES
    assert (summary["shard"]["min"], summary["shard"]["max"], summary["shard"]["values"]) == (0, 99, [])
    assert summary["year"]["types"] == ["number", "string"] and summary["year"]["max"] == 2019
    assert len(summary["year"]["values"]) == filters.VALUES_SHOWN and summary["year"]["more_values"]
    assert summary["signed"]["images"] == len(range(0, N_IMAGES, 7))


def _mark_far(sessions, ids, vectors, query) -> np.ndarray:
    """Give every image `far`: false for the query's 500 nearest, true for the rest; returns the 500 ids."""
    near = ids[np.argsort(-(vectors @ query))[:500]]
    with sessions() as s, s.begin():
        s.execute(sa.text("UPDATE images SET metadata = metadata || jsonb_build_object('far', NOT (id = ANY(:near)))"),
                  {"near": near.tolist()})
    return near


def test_post_filter_fetches_more_until_the_page_is_full(random_collection, sessions, monkeypatch):
    """The query's 500 nearest images are the ones the filter leaves out: the first fetches find no match, and the
    search fetches more until it has the page, the true top 20 of the rest."""
    open_search, ids, vectors, cats, metas = random_collection
    query = vectors[5]
    near = _mark_far(sessions, ids, vectors, query)
    monkeypatch.setattr(filters, "PREFILTER_MAX_IDS", 1000)  # 2,500 match: a post-filter
    rounds = []
    real = filters.which_match
    monkeypatch.setattr(filters, "which_match", lambda s, where, candidates: rounds.append(len(candidates)) or
                        real(s, where, candidates))
    search = open_search()
    got = search.search_vector(query, 20, use_prototypes=False, where=from_json({"far": True}))
    expected, _ = _brute_force(query, vectors, ids, ~np.isin(ids, near), 20)
    assert [r.image_id for r in got.results] == expected
    assert len(rounds) >= 3 and rounds == sorted(rounds)


def test_post_filter_searches_among_every_match_past_its_fetch_limit(random_collection, sessions, monkeypatch):
    """The same far-away matches, with the post-filter allowed to fetch 200 results at most: it then searches among
    the ids of every match, and the answer is still the true top 20."""
    open_search, ids, vectors, cats, metas = random_collection
    query = vectors[5]
    near = _mark_far(sessions, ids, vectors, query)
    monkeypatch.setattr(filters, "PREFILTER_MAX_IDS", 1000)
    monkeypatch.setattr("backend.service.planner.POST_FILTER_MAX_FETCH", 200)
    fallbacks = []
    real = filters.all_matching_ids
    monkeypatch.setattr(filters, "all_matching_ids", lambda s, where: fallbacks.append(1) or real(s, where))
    got = open_search().search_vector(query, 20, use_prototypes=False, where=from_json({"far": True}))
    expected, _ = _brute_force(query, vectors, ids, ~np.isin(ids, near), 20)
    assert [r.image_id for r in got.results] == expected and fallbacks == [1]
