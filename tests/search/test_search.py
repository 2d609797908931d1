"""The two-stage search module on small hand-checkable vectors: numpy in, numpy out."""
import faiss
from faiss.contrib.inspect_tools import get_invlist
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.embedding.vectors import l2_normalize
from backend.search.category_index import CategoryIndex
from backend.search.partition import INDEX_TYPES, Partition, Selection


def _collection(n=300, d=16, categories=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(categories, d))
    cats = rng.integers(0, categories, n)
    vectors = l2_normalize(centres[cats] + 0.6 * rng.normal(size=(n, d)))
    ids = rng.permutation(np.arange(1000, 1000 + n))
    return ids.astype(np.int64), vectors, (cats + 10).astype(np.int64)


def _prototypes(ids, vectors, cats):
    uniq = np.unique(cats)
    return uniq, l2_normalize(np.stack([vectors[cats == c].mean(axis=0) for c in uniq]))


def _index(ids, vectors, cats, index_type="flatip"):
    index = CategoryIndex(vectors.shape[1], index_type)
    index.add(ids, vectors, cats)
    index.set_prototypes(*_prototypes(ids, vectors, cats))
    return index


def _brute_force(vectors, ids, queries, k):
    sims = queries @ vectors.T
    order = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=1)[:, :k]
    return ids[order], np.take_along_axis(sims, order, axis=1)


def test_hand_checkable_toy_case():
    index = CategoryIndex(2)
    index.add([1, 2, 3, 4], np.array([[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8]], np.float32), [7, 7, 8, 8])
    index.set_prototypes([7, 8], l2_normalize(np.array([[0.9, 0.3], [-0.3, 0.9]])))
    hits = index.search(np.array([[1.0, 0.0]]), k=2, top_categories=1)[0]
    assert hits.ids.tolist() == [1, 2] and np.allclose(hits.scores, [1.0, 0.8])
    assert [c for c, _ in hits.prototype_ranking] == [7, 8] and hits.searched_categories == [7]
    everything = index.search(np.array([[0.0, 1.0]]), k=3, use_prototypes=False)[0]
    assert everything.ids.tolist() == [3, 4, 2] and np.allclose(everything.scores, [1.0, 0.8, 0.6])
    assert everything.categories.tolist() == [8, 8, 7]


@pytest.mark.parametrize("use_prototypes, top", [(False, None), (True, None), (True, 5)])
def test_all_categories_with_exact_index_equal_brute_force(use_prototypes, top):
    ids, vectors, cats = _collection()
    queries = l2_normalize(np.random.default_rng(9).normal(size=(25, vectors.shape[1])))
    expected_ids, expected_scores = _brute_force(vectors, ids, queries, k=10)
    hits = _index(ids, vectors, cats).search(queries, k=10, top_categories=top, use_prototypes=use_prototypes)
    for h, e_ids, e_scores in zip(hits, expected_ids, expected_scores):
        assert h.ids.tolist() == e_ids.tolist()
        np.testing.assert_allclose(h.scores, e_scores, atol=1e-5)


def test_flat_l2_scores_are_one_over_one_plus_distance_and_rank_like_cosine():
    ids, vectors, cats = _collection()
    q = vectors[:3]
    ip = _index(ids, vectors, cats, "flatip").search(q, 5, use_prototypes=False)
    l2 = _index(ids, vectors, cats, "flatl2").search(q, 5, use_prototypes=False)
    position = {i: p for p, i in enumerate(ids.tolist())}
    for query, a, b in zip(q, ip, l2):
        assert a.ids.tolist() == b.ids.tolist()  # unit vectors: L2 order = cosine order
        distances = np.linalg.norm(vectors[[position[i] for i in b.ids.tolist()]] - query, axis=1)
        np.testing.assert_allclose(b.scores, 1 / (1 + distances), atol=1e-3)
        assert b.scores[0] == pytest.approx(1.0, abs=1e-3)  # the query itself, distance 0


@pytest.mark.parametrize("index_type", ["fp16", "hnsw", "ivfflat", "ivffp16", "rabitq"])
def test_approximate_indexes_find_the_exact_neighbours(index_type, monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)  # so the small test categories use IVF
    ids, vectors, cats = _collection(n=600)
    exact = _index(ids, vectors, cats).search(vectors[:20], 10, use_prototypes=False)
    approx = _index(ids, vectors, cats, index_type).search(vectors[:20], 10, use_prototypes=False)
    recall = np.mean([len(set(a.ids) & set(e.ids)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.8
    assert all(a.ids[0] == ids[i] for i, a in enumerate(approx))  # each vector finds itself first


def test_prototype_stage_restricts_to_the_top_categories():
    ids, vectors, cats = _collection()
    index = _index(ids, vectors, cats)
    for hits in index.search(vectors[:10], k=20, top_categories=2):
        top2 = [c for c, _ in hits.prototype_ranking[:2]]
        assert set(hits.categories.tolist()) <= set(top2) and hits.searched_categories == top2
        sims = [s for _, s in hits.prototype_ranking]
        assert sims == sorted(sims, reverse=True) and len(sims) == 5


def test_category_filter_restricts_the_search():
    ids, vectors, cats = _collection()
    index = _index(ids, vectors, cats)
    mask = np.isin(cats, [11, 13])
    expected, _ = _brute_force(vectors[mask], ids[mask], vectors[:5], 15)
    for use_prototypes in (True, False):
        hits = index.search(vectors[:5], k=15, categories=[11, 13], use_prototypes=use_prototypes, top_categories=None)
        assert [h.ids.tolist() for h in hits] == expected.tolist()
        assert all(set(h.categories.tolist()) <= {11, 13} for h in hits)
    one = index.search(vectors[:5], k=15, categories=[11, 13], top_categories=1)
    assert all(len(set(h.categories.tolist())) == 1 and h.searched_categories[0] in (11, 13) for h in one)
    assert all(len(h.ids) == 0 for h in index.search(vectors[:2], k=5, categories=[999]))


def test_bad_shapes_are_rejected():
    index = CategoryIndex(4)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.add([1], np.ones((1, 3)), [0])
    with pytest.raises(ValueError, match="ids"):
        index.add([1, 2], np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((1, 4)), 0)
    with pytest.raises(ValueError, match="unknown index type"):
        CategoryIndex(4, "lsh")


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_stored_round_trip_reads_in_place_until_changed(index_type, monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)  # so the small test categories use IVF
    ids, vectors, cats = _collection()
    index = _index(ids, vectors, cats, index_type)
    blobs = {c: faiss.serialize_index(stored) for c, stored in index.stored_partitions()}
    full = {c: (ids, index.store.get(ids, np.float16)) for c, ids in index.members()} if index.kind.rerank else None
    restored = CategoryIndex.from_stored(index.dim, index_type, blobs, *index.prototypes(), full)
    a, b = index.search(vectors[:5], 7), restored.search(vectors[:5], 7)
    assert [h.ids.tolist() for h in a] == [h.ids.tolist() for h in b]
    assert restored.categories == index.categories and len(restored) == len(index)
    assert all(isinstance(stored, np.ndarray) for _, stored in restored.stored_partitions())  # still the bytes
    restored.remove(ids[:3])
    restored.add(ids[:2], vectors[:2], cats[:2])  # each change copies its category out of the bytes first
    assert len(restored) == len(index) - 1 and ids[2] not in restored
    assert restored.search(vectors[:2], 1, use_prototypes=False)[0].ids.tolist()[0] == ids[0]


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_vectors_read_back_from_each_index_type(index_type, monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)
    ids, vectors, cats = _collection()
    index = _index(ids, vectors, cats, index_type)
    position = {i: p for p, i in enumerate(ids.tolist())}
    seen = 0
    for c, part_ids, part_vectors in index.partitions():
        rows = [position[i] for i in part_ids.tolist()]
        assert (cats[rows] == c).all()
        np.testing.assert_allclose(part_vectors, vectors[rows], atol=index.kind.tolerance)
        seen += len(part_ids)
    assert seen == len(ids)
    sizes = index.category_sizes()
    assert index.nbytes() >= len(ids) * vectors.shape[1] * (2 if "fp16" in index_type else 4)
    assert sum(sizes.values()) == len(ids)


def test_ivf_categories_are_reclustered_as_they_grow_and_shrink(monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)
    ids, vectors, cats = _collection(n=1200, categories=1)
    index = CategoryIndex(vectors.shape[1], "ivfflat")
    index.add(ids[:40], vectors[:40], cats[:40])
    part = index._partitions[int(cats[0])]
    assert part.lists() == 0  # small: scanned exactly
    index.add(ids[40:160], vectors[40:160], cats[40:160])
    assert part.lists() == 160 // 39  # k-means wants 39 points a list
    index.add(ids[160:300], vectors[160:300], cats[160:300])
    assert part.lists() == 160 // 39  # within 2x of what 300 would get: kept
    index.add(ids[300:], vectors[300:], cats[300:])
    assert part.lists() == 1200 // 39  # below sqrt(1200) = 35 for the same reason
    index.remove(ids[20:])
    assert part.lists() == 0 and len(index) == 20


def test_hnsw_hides_deletions_and_rebuilds_a_category_once_a_quarter_is_gone():
    ids, vectors, cats = _collection(n=200, categories=1)
    index = _index(ids, vectors, cats, "hnsw")
    part = index._partitions[int(cats[0])]
    index.remove(ids[:40])
    assert part.hidden == set(ids[:40].tolist()) and part.index.ntotal == 200
    hits = index.search(vectors[:40], 5, use_prototypes=False)
    assert not set(np.concatenate([h.ids for h in hits]).tolist()) & set(ids[:40].tolist())
    index.add(ids[:1], vectors[:1], cats[:1])  # re-adding a hidden id rebuilds first: it is found again
    assert index.search(vectors[:1], 1, use_prototypes=False)[0].ids.tolist() == [ids[0]]
    index.remove(ids[1:80])
    assert not part.hidden or part.index.ntotal < 200  # past a quarter: rebuilt without them
    assert len(index) == 121 and sorted(index._partitions[int(cats[0])].ids().tolist()) == index.ids().tolist()


OPS = st.lists(st.tuples(st.sampled_from(["add", "delete"]), st.integers(1, 40), st.integers(0, 2**31)),
               min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
@pytest.mark.parametrize("index_type", ["flatip", "fp16"])  # the exact scans: the same answers however built
def test_any_sequence_of_adds_and_deletes_equals_a_fresh_build(index_type, ops):
    ids, vectors, cats = _collection(n=400)
    index = CategoryIndex(vectors.shape[1], index_type)
    present: set[int] = set()
    for op, n, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "add":
            pool = np.array([i for i in range(len(ids)) if ids[i] not in present])
            pick = rng.choice(pool, size=min(n, len(pool)), replace=False) if len(pool) else []
            if len(pick):
                index.add(ids[pick], vectors[pick], cats[pick])
                present.update(ids[pick].tolist())
        elif present:
            gone = rng.choice(sorted(present), size=min(n, len(present)), replace=False)
            assert index.remove(gone) == len(gone)
            present.difference_update(gone.tolist())
    rows = np.array([i for i in range(len(ids)) if ids[i] in present], dtype=np.int64)
    if not len(rows):
        assert len(index) == 0
        return
    fresh = CategoryIndex(vectors.shape[1], index_type)
    fresh.add(ids[rows][::-1], vectors[rows][::-1], cats[rows][::-1])  # another order on purpose
    for built in (index, fresh):
        built.set_prototypes(*_prototypes(ids[rows], vectors[rows], cats[rows]))
    queries = vectors[:8]
    for a, b in zip(index.search(queries, 10, top_categories=2), fresh.search(queries, 10, top_categories=2)):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert index.ids().tolist() == sorted(present)


def test_a_compressed_index_probes_the_lists_closest_to_the_query_across_categories(monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)  # a few lists in each category
    monkeypatch.setattr("backend.search.partition.COMPRESSED_POINTS_PER_LIST", 39)
    ids, vectors, cats = _collection(n=600)
    index = _index(ids, vectors, cats, "rabitq")
    index.probe_lists = 1  # the one list, of all categories', whose centre is closest
    for i in range(20):
        hits = index.search(vectors[i:i + 1], 10, top_categories=None)[0]
        part = index._partitions[int(cats[i])]
        closest = int(part.index.quantizer.search(vectors[i:i + 1], 1)[1][0, 0])  # a vector's own list
        assert hits.ids[0] == ids[i] and set(hits.ids.tolist()) <= set(get_invlist(part.index.invlists, closest)[0])
    index.probe_lists, index.rerank = 10**6, 100  # every list, and every candidate re-scored: the exact answer
    exact = _index(ids, vectors, cats).search(vectors[:20], 10, top_categories=3)
    position = {i: p for p, i in enumerate(ids.tolist())}
    for q, (got, expected) in enumerate(zip(index.search(vectors[:20], 10, top_categories=3), exact)):
        # The exact top 10 up to float16's rounding: each id's score its true one, and the scores those of exact.
        true = [float(vectors[position[i]] @ vectors[q]) for i in got.ids.tolist()]
        assert np.allclose(got.scores, true, atol=1e-3) and np.allclose(got.scores, expected.scores, atol=1e-3)
        assert got.searched_categories == expected.searched_categories


def test_a_compressed_index_searches_nothing_where_no_category_is_chosen():
    ids, vectors, cats = _collection()
    index = _index(ids, vectors, cats, "rabitq")
    for hits in (index.search(vectors[:1], 5, categories=[99])[0],
                 index.search(vectors[:1], 5, categories=[99], use_prototypes=False)[0],
                 CategoryIndex(vectors.shape[1], "rabitq").search(vectors[:1], 5)[0]):
        assert hits.ids.tolist() == [] and hits.searched_categories == []


def test_a_compressed_category_learns_its_centres_again_as_it_grows(monkeypatch):
    """Its first add may be one image; a category under IVF_MIN_VECTORS keeps one list, whose centre stage 1 ranks."""
    ids, vectors, cats = _collection(n=400, categories=1)
    index = CategoryIndex(vectors.shape[1], "rabitq")
    index.add(ids[:1], vectors[:1], cats[:1])
    for start in range(1, 400, 50):
        index.add(ids[start:start + 50], vectors[start:start + 50], cats[start:start + 50])
    centre = index._partitions[int(cats[0])].centroids()[0]
    mean = vectors.mean(0)
    assert centre @ mean / np.linalg.norm(mean) / np.linalg.norm(centre) > 0.99  # not the first image's
    assert abs(float(centre @ vectors[0]) / np.linalg.norm(centre) - 1) > 0.05


def test_a_pre_filter_that_names_an_image_twice_finds_it_once():
    ids, vectors, cats = _collection()
    among = np.repeat(ids[:6], 2)
    for index_type in ("flatip", "rabitq"):
        found = _index(ids, vectors, cats, index_type).search(vectors[:1], 5, among=among)[0].ids.tolist()
        assert len(found) == len(set(found)) == 5, index_type


def test_a_compressed_pre_filter_of_few_matches_scores_every_one_from_its_full_vector(monkeypatch):
    ids, vectors, cats = _collection(n=600)
    index = _index(ids, vectors, cats, "rabitq")
    index.rerank = 1  # by code, 2 results x 1 x FILTERED_RERANK = 8 candidates of the 300 matches would be re-scored
    ranked_by_code = []
    real_candidates = Partition.candidates
    monkeypatch.setattr(Partition, "candidates", lambda *a, **k: ranked_by_code.append(1) or real_candidates(*a, **k))
    among = ids[::2]
    kept = np.isin(ids, among)
    rows = vectors[kept].astype(np.float16).astype(np.float32)  # what the vector store holds
    for q in range(0, 40, 2):
        want_ids, want_scores = _brute_force(rows, ids[kept], vectors[q:q + 1], 2)
        hits = index.search(vectors[q:q + 1], 2, use_prototypes=False, among=among)[0]
        assert hits.ids.tolist() == want_ids[0].tolist() and np.allclose(hits.scores, want_scores[0], atol=1e-5)
    category_of = dict(zip(ids.tolist(), cats.tolist()))
    for q in range(1, 40, 3):  # two-stage: exact among the matches of the categories stage 1 chose, labelled right
        hits = index.search(vectors[q:q + 1], 3, top_categories=2, among=among)[0]
        chosen = np.isin(cats, hits.searched_categories) & kept
        want_ids, _ = _brute_force(vectors[chosen].astype(np.float16).astype(np.float32), ids[chosen],
                                   vectors[q:q + 1], 3)
        assert len(hits.searched_categories) == 2 and hits.ids.tolist() == want_ids[0].tolist()
        assert hits.categories.tolist() == [category_of[i] for i in hits.ids.tolist()]
    assert not ranked_by_code
    monkeypatch.setattr("backend.search.category_index.LIST_COST_IN_VALUES", 0)  # lists cost nothing: by code
    index.search(vectors[:1], 2, use_prototypes=False, among=among)
    assert ranked_by_code


def test_a_compressed_search_re_scores_rerank_candidates_per_result(monkeypatch):
    ids, vectors, cats = _collection(n=600)
    index = _index(ids, vectors, cats, "rabitq")
    scored = []
    real_scores = index.store.scores
    monkeypatch.setattr(index.store, "scores", lambda ids, q: scored.append(len(ids)) or real_scores(ids, q))
    index.search(vectors[:1], 3, use_prototypes=False, rerank=2)
    index.search(vectors[:1], 3, use_prototypes=False)
    assert scored == [3 * 2, 3 * index.rerank]
    with pytest.raises(ValueError, match="rerank"):
        index.search(vectors[:1], 3, rerank=0)


def test_a_compressed_pre_filter_with_many_matches_re_scores_the_best_by_code(monkeypatch):
    monkeypatch.setattr("backend.search.category_index.LIST_COST_IN_VALUES", 0)  # as if the matches were many
    ids, vectors, cats = _collection(n=600)
    index = _index(ids, vectors, cats, "rabitq")
    index.rerank = 1  # 2 results x 1 x FILTERED_RERANK = 8 candidates: fewer than the 300 matches
    among = ids[::2]
    for q in range(0, 40, 2):
        hits = index.search(vectors[q:q + 1], 2, use_prototypes=False, among=among)[0]
        assert hits.ids[0] == ids[q] and set(hits.ids.tolist()) <= set(among.tolist())
        position = {i: p for p, i in enumerate(ids.tolist())}
        assert np.allclose(hits.scores, [vectors[position[i]] @ vectors[q] for i in hits.ids.tolist()], atol=1e-3)


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_a_pre_filter_is_exact_with_dense_ids_and_with_ids_far_apart(index_type):
    # Dense ids are tested by a bitmap over them, ids far apart (one near 2**40) by a hash set: both exact.
    ids, vectors, cats = _collection(n=400)
    ids[7] = 2 ** 40
    index = _index(ids, vectors, cats, index_type)
    for among, kind in ((ids[ids % 5 == 0], faiss.IDSelectorBitmap),
                        (np.concatenate([ids[:3], ids[7:8]]), faiss.IDSelectorBatch)):
        assert isinstance(Selection(among).selector, kind)
        kept = np.isin(ids, among)
        for q in range(10):
            want_ids, want_scores = _brute_force(vectors[kept], ids[kept], vectors[q:q + 1], 3)
            hits = index.search(vectors[q:q + 1], 3, use_prototypes=False, among=among)[0]
            assert hits.ids.tolist() == want_ids[0].tolist(), (index_type, len(among), q)
            if index_type != "flatl2":  # whose scores are 1 / (1 + distance): its order is checked above
                assert np.allclose(hits.scores, want_scores[0], atol=2e-3)


def test_a_compressed_categorys_lists_hold_enough_codes_to_outweigh_their_centres():
    # Centres are 4 bytes a dimension, codes 1 bit: 2,000 vectors in sqrt(2000) = 45 lists spent more RAM on the
    # centres than on the codes. Now they take at most a quarter of what the codes take.
    ids, vectors, cats = _collection(n=4000, d=64, categories=2)
    index = _index(ids, vectors, cats, "rabitq")
    for c, members in index.members():
        lists = index._partitions[c].index.nlist
        assert lists > 1 and lists * 64 * 4 <= len(members) * 64 / 8 / 4, lists


def test_a_compressed_categorys_centres_follow_its_index_when_a_loaded_one_changes(monkeypatch):
    monkeypatch.setattr("backend.search.partition.IVF_MIN_VECTORS", 50)
    monkeypatch.setattr("backend.search.partition.COMPRESSED_POINTS_PER_LIST", 39)
    ids, vectors, cats = _collection(n=600, categories=2)
    index = _index(ids, vectors, cats, "rabitq")
    blobs = {c: faiss.serialize_index(stored) for c, stored in index.stored_partitions()}
    full = {c: (ids, index.store.get(ids, np.float16)) for c, ids in index.members()}
    restored = CategoryIndex.from_stored(index.dim, "rabitq", blobs, *index.prototypes(), full)
    restored.search(vectors[:1], 5)  # the centres are looked at (and kept) before the change
    c = int(cats[0])
    restored.remove(ids[:1])  # the category leaves the snapshot's bytes for an index of its own
    part = restored._partitions[c]
    assert part.index.nlist > 1
    quantizer = faiss.downcast_index(part.index.quantizer)  # a view of this index's centres, not a freed one's
    assert part.centroids().ctypes.data == int(quantizer.get_xb())
    np.testing.assert_array_equal(part.centroids(), quantizer.reconstruct_n(0, part.index.nlist))


@pytest.mark.parametrize("ids", [[0, 1, 2, 7, 8, 9, 63, 64, 1000], [5], [3, 3, 300], list(range(0, 5000, 3)),
                                 [1, 2, 2**40]])
def test_a_pre_filters_selector_accepts_exactly_its_ids(ids):
    selector = Selection(np.array(ids)).selector
    assert isinstance(selector, faiss.IDSelectorBatch if max(ids) > 2**20 else faiss.IDSelectorBitmap)
    probe = sorted(set(range(min(ids[-1], 6000) + 20)) | set(ids) | {2**40 + 1})
    assert [i for i in probe if selector.is_member(i)] == sorted(set(ids))
