"""A projection learnt from the categories (backend.embedding.projection, backend.pipeline.train_projection): it lifts precision where
the categories differ along some directions only, its output is unit-norm and deterministic, a stored head
round-trips through PostgreSQL, and its derived model stays complete as the collection changes."""
import numpy as np
import pytest
import sqlalchemy as sa

from backend.embedding import projection
from backend.pipeline.train_projection import precision_at_k, train_head, train_projection
from backend.service.image_search import ImageSearch
from backend.storage import heads as head_store
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.tables import Embedding, Prototype
from tests.helpers import PixelEmbedder, class_images, png_bytes, write_folder_dataset

DERIVED = projection.derived_name(PixelEmbedder.name)


def _separable_along_a_few_directions(n_per_class: int, seed: int, classes: int = 8, dim: int = 64, signal: int = 4):
    """Unit vectors whose class shows in `signal` of `dim` coordinates only, drowned by noise in the others: raw
    nearest neighbours are mostly of other classes; the right directions separate them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, signal))  # the same classes in every sample
    labels = np.repeat(np.arange(classes), n_per_class)
    vectors = rng.normal(size=(len(labels), dim)) * 1.0
    vectors[:, :signal] = centres[labels] * 1.2 + rng.normal(size=(len(labels), signal)) * 0.3
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def test_training_where_classes_differ_along_a_few_directions_lifts_held_out_precision():
    train_x, train_y = _separable_along_a_few_directions(150, seed=0)
    test_x, test_y = _separable_along_a_few_directions(40, seed=1)  # never seen by training
    weights, report = train_head(train_x, train_y, dim=16, kind="mlp", epochs=40, progress=False)
    head = projection.Head(1, DERIVED, PixelEmbedder.name, "mlp", weights)
    raw = precision_at_k(test_x, test_y, train_x, train_y)
    projected = precision_at_k(head.apply(test_x), test_y, head.apply(train_x), train_y)
    assert raw < 0.5 and projected > raw + 0.25, (raw, projected)
    assert report["held_out_precision@10"]["projected"] > report["held_out_precision@10"]["raw"]
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 40 and report["base_no_match_threshold"] is not None


def test_the_head_is_unit_norm_deterministic_and_training_repeats_itself():
    x, y = _separable_along_a_few_directions(30, seed=2)
    first, _ = train_head(x, y, dim=8, kind="linear", epochs=3, progress=False)
    again, _ = train_head(x, y, dim=8, kind="linear", epochs=3, progress=False)
    assert all(np.array_equal(first[k], again[k]) for k in first)  # same data and seed, same head
    head = projection.Head(1, DERIVED, PixelEmbedder.name, "linear", first)
    out = head.apply(x)
    assert out.shape == (len(x), 8) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert np.array_equal(out, head.apply(x)) and np.array_equal(out[:5], head.apply(x[:5]))


def test_training_needs_two_categories():
    x, _ = _separable_along_a_few_directions(10, seed=3)
    with pytest.raises(Exception, match="at least two categories"):
        train_head(x, np.zeros(len(x), int), epochs=1, progress=False)


@pytest.fixture
def collection(sessions, tmp_path):
    """Red, green and blue images stored with PixelEmbedder vectors."""
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap", batch_size=8)
    write_folder_dataset(tmp_path / "f", n_per_class=10)
    search.build_database("folder", tmp_path / "f", progress=False)
    search.close()
    return sessions


def _vectors(sessions, model):
    with sessions() as s:
        rows = s.execute(sa.select(Embedding.image_id, Embedding.vector).where(Embedding.model_name == model)
                         .order_by(Embedding.image_id)).all()
    return [r[0] for r in rows], np.stack([np.asarray(r[1], np.float32) for r in rows]) if rows else None


def test_a_published_head_round_trips_through_postgresql_and_projects_every_vector(collection):
    head = train_projection(collection, PixelEmbedder.name, dim=8, epochs=3, progress=False)
    with collection() as s:
        stored = head_store.current_head(s, DERIVED)
        head_store.forget_parsed()  # parse the stored bytes again, not the cached copy
        parsed = head_store.current_head(s, DERIVED)
        prototypes = s.scalar(sa.select(sa.func.count()).select_from(Prototype).where(Prototype.model_name == DERIVED))
    assert stored.version == parsed.version == head.version and parsed.kind == "mlp"
    assert parsed.weights.keys() == head.weights.keys()
    assert all(np.array_equal(parsed.weights[k], head.weights[k]) for k in head.weights)
    assert parsed.report["train_vectors"] + parsed.report["held_out_vectors"] == 30
    base_ids, base = _vectors(collection, PixelEmbedder.name)
    ids, derived = _vectors(collection, DERIVED)
    assert ids == base_ids and np.allclose(derived, head.apply(base), atol=1e-5)
    assert prototypes == 3


def test_the_derived_model_follows_additions_deletions_and_a_new_version(collection, tmp_path):
    train_projection(collection, PixelEmbedder.name, dim=8, epochs=3, progress=False)
    with collection() as s:
        embedder = projection.ProjectedEmbedder(PixelEmbedder(), head_store.require_head(s, DERIVED))
    search = ImageSearch(collection, embedder, snapshot_dir=tmp_path / "snap", batch_size=8)
    assert (search.index.dim, len(search.index)) == (8, 30)
    rng = np.random.default_rng(5)
    from PIL import Image
    blue = png_bytes(Image.fromarray(np.dstack([rng.integers(0, 60, (24, 24)), rng.integers(0, 60, (24, 24)),
                                                rng.integers(200, 256, (24, 24))]).astype(np.uint8)))
    added = search.add_image(blue, "blue").image_id  # stored with its base vector; the store derives the other
    top = search.search_similar(blue, k=1).results[0]
    assert top.image_id == added and top.score > 0.999 and top.category == "blue"
    base_ids, _ = _vectors(collection, PixelEmbedder.name)
    assert _vectors(collection, DERIVED)[0] == base_ids
    search.delete_image(added)
    assert added not in _vectors(collection, DERIVED)[0] and len(search.index) == 30

    newer = train_projection(collection, PixelEmbedder.name, dim=6, kind="linear", epochs=2, progress=False)
    search.refresh()  # what live sync does on the announcement
    assert search.embedder.head.version == newer.version and search.index.dim == 6 and len(search.index) == 30
    assert search.search_similar(blue, k=3).results[0].category == "blue"
    assert search.check().ok
    search.close()
    reopened = ImageSearch(collection, projection.ProjectedEmbedder(PixelEmbedder(), newer),
                           snapshot_dir=tmp_path / "snap", batch_size=8)
    assert reopened.index_source == "snapshot" and reopened.index.dim == 6  # the new version's snapshot
    reopened.close()


def test_a_derived_model_without_a_head_says_how_to_train_one(sessions):
    from backend.errors import ModelUnavailable
    from backend.service.model_choice import ModelChoice, load_embedder

    with pytest.raises(ModelUnavailable, match="train-projection"):
        load_embedder(ModelChoice(DERIVED, "MODEL_NAME", "set"), sessions, load=False)


def test_training_without_vectors_in_categories_is_a_clear_error(sessions):
    from backend.errors import ImsrcError

    with sessions() as s, s.begin():
        image_store.ensure_model(s, PixelEmbedder.name, PixelEmbedder.dim)
    with pytest.raises(ImsrcError, match="no test-pixels vectors are in a category|no test-pixels vectors"):
        train_projection(sessions, PixelEmbedder.name, epochs=1, progress=False)


def test_a_derived_model_judges_no_close_match_in_its_base_space(collection, tmp_path):
    from PIL import Image

    head = train_projection(collection, PixelEmbedder.name, dim=8, epochs=3, progress=False)
    search = ImageSearch(collection, projection.ProjectedEmbedder(PixelEmbedder(), head),
                         snapshot_dir=tmp_path / "snap", batch_size=8)
    gray = png_bytes(Image.new("RGB", (24, 24), (128, 128, 128)))  # unlike every red, green or blue image
    red = png_bytes(Image.fromarray(class_images(1, seed=9)[0][0]))  # a new one, like the stored red images
    unlike, like = search.search_similar(gray, k=3).confidence, search.search_similar(red, k=3).confidence
    assert unlike["threshold"] == like["threshold"] == head.report["base_no_match_threshold"]
    base = PixelEmbedder().embed([Image.open(__import__("io").BytesIO(gray))])[0]
    with collection() as s:
        _, base_prototypes, _ = prototype_store.load_prototypes(s, PixelEmbedder.name)
    assert unlike["best_similarity"] == pytest.approx(float((base_prototypes @ base).max()), abs=1e-4)
    assert not unlike["close_match"] and like["close_match"], (unlike, like)
    search.close()


def test_a_search_meets_the_head_its_index_was_built_with_until_it_syncs(collection, tmp_path):
    first = train_projection(collection, PixelEmbedder.name, dim=8, epochs=2, progress=False)
    search = ImageSearch(collection, projection.ProjectedEmbedder(PixelEmbedder(), first),
                         snapshot_dir=tmp_path / "snap", batch_size=8)
    some_id = search.index.assignments().popitem()[0]
    train_projection(collection, PixelEmbedder.name, dim=5, kind="linear", epochs=2, progress=False)
    # Published, not yet synced here: the stored derived vectors are 5-d, the index and its head still 8-d.
    hits = search.search_by_id(some_id, k=3).results
    assert len(hits) == 3 and search.index.dim == 8 and search.embedder.head.version == first.version
    search.refresh()
    assert search.index.dim == 5 and len(search.search_by_id(some_id, k=3).results) == 3
    search.close()
