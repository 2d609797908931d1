"""Stage 1's confidence: calibrated from the collection's own images, it flags queries unlike every category."""
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.search.category_index import CategoryIndex
from backend.search.confidence import QUANTILE, Calibration, assess, calibrate
from tests.helpers import class_images, folder_opener, png_bytes


def _clustered(n_per_category=300, categories=4, dim=32, spread=0.3, index_type="flatip", seed=0):
    """Categories as tight clusters around orthogonal centres, with their mean vectors as prototypes."""
    rng = np.random.default_rng(seed)
    index = CategoryIndex(dim, index_type)
    centres = np.eye(dim, dtype=np.float32)[:categories]
    for c, centre in enumerate(centres):
        vectors = centre + spread * rng.standard_normal((n_per_category, dim)).astype(np.float32) / np.sqrt(dim)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.add(np.arange(n_per_category) + c * n_per_category, vectors, np.full(n_per_category, c))
        mean = vectors.mean(0)
        index.set_prototypes([c], (mean / np.linalg.norm(mean))[None, :])
    return index, centres, rng


def test_the_threshold_is_the_quantile_of_the_collection_s_own_best_similarities():
    for index_type in ("flatip", "flatl2", "fp16", "ivfflat", "ivffp16", "hnsw", "rabitq"):
        index, _, _ = _clustered(n_per_category=1200, index_type=index_type)
        cats, prototypes = index.prototypes()
        everything = np.concatenate([v for _, _, v in index.partitions()])
        exact = np.quantile((everything @ prototypes.T).max(1), QUANTILE)
        assert abs(calibrate(index) - exact) < 0.02, index_type  # a sample of 200 per category, close to all


def test_queries_like_the_collection_pass_and_unlike_ones_are_flagged():
    index, centres, rng = _clustered()
    threshold = calibrate(index)
    like = centres[1] + 0.3 * rng.standard_normal((500, centres.shape[1])).astype(np.float32) / np.sqrt(32)
    like /= np.linalg.norm(like, axis=1, keepdims=True)
    flagged = np.mean([not assess(s, threshold).close_match for s in index.rank_prototypes(like)[1]])
    assert flagged <= 0.03  # held out, drawn like the collection: about QUANTILE of them
    unlike = np.eye(32, dtype=np.float32)[10]  # a direction no category lives in
    found = assess(index.rank_prototypes(unlike[None, :])[1][0], threshold)
    assert not found.close_match and found.best_similarity < threshold
    between = (centres[0] + centres[1]) / np.sqrt(2)  # as like two categories as each other: a small margin
    assert assess(index.rank_prototypes(between[None, :])[1][0], threshold).margin < 0.05


def test_the_calibration_is_drawn_again_only_when_the_collection_changed_enough():
    index, _, rng = _clustered()
    calibration = Calibration()
    first = calibration.current(index)
    index.add(np.arange(5) + 10_000, np.eye(32, dtype=np.float32)[:5] * 1.0, np.zeros(5, np.int64))
    assert calibration.current(index) == first  # 5 images in 1,200: the same threshold, not recomputed
    far = np.eye(32, dtype=np.float32)[20:21].repeat(400, 0)  # a third more images, all unlike category 0
    index.add(np.arange(400) + 20_000, far, np.zeros(400, np.int64))
    assert calibration.current(index) < first
    assert assess(np.zeros(0), first) is None and assess(np.array([0.5]), None) is None


def test_the_api_says_how_sure_stage_1_is(sessions, tmp_path):
    app = create_app(folder_opener(sessions, tmp_path, n_per_class=20))
    with TestClient(app) as client:
        red = Image.fromarray(class_images(1, seed=99)[0][0])  # drawn as the collection's reds were, not stored
        reddish = client.post("/search", files={"file": ("q.png", png_bytes(red))})
        confidence = reddish.json()["confidence"]
        assert confidence["close_match"] and confidence["best_similarity"] >= confidence["threshold"]
        assert confidence["margin"] > 0.1  # red is far from green and blue
        stripes = np.zeros((32, 32, 3), np.uint8)
        stripes[::2] = 255  # black and white: like no colour of the collection
        odd = client.post("/search", files={"file": ("q.png", png_bytes(Image.fromarray(stripes)))}).json()
        assert odd["confidence"]["close_match"] is False and len(odd["results"]) == 10  # results, flagged
        assert client.post("/search/prototypes", files={"file": ("q.png", png_bytes(Image.fromarray(stripes)))}
                           ).json()["confidence"]["close_match"] is False
