"""Several examples at once, and a region of the query, through the Python API against a real PostgreSQL."""
import numpy as np
import pytest
from PIL import Image

from backend.embedding.models import create_embedder
from backend.embedding.query_edits import QueryEdit
from backend.errors import InvalidQuery, NotFound
from backend.search.examples import MAX_EXAMPLES
from backend.service.image_search import ImageSearch
from tests.helpers import PixelEmbedder, png_bytes, write_folder_dataset
from tests.service.test_filters import DIM, read_only_collection  # noqa: F401 - a fixture


def _unit(v):
    return v / np.linalg.norm(v)


def test_mean_strategy_is_exact_against_brute_force(read_only_collection):  # noqa: F811
    open_search, ids, vectors, cats, metas = read_only_collection
    search = open_search()
    pos, neg = [3, 40, 700], [12]
    query = _unit(vectors[pos].mean(axis=0) - 0.5 * vectors[neg].mean(axis=0))
    got = search.search_examples(ids[pos].tolist(), ids[neg].tolist(), 15, use_prototypes=False, negative_weight=0.5)
    scores = vectors @ query
    scores[pos + neg] = -np.inf  # the examples themselves are left out
    expected = ids[np.lexsort((ids, -scores))[:15]].tolist()
    assert [r.image_id for r in got.results] == expected
    np.testing.assert_allclose([r.score for r in got.results], np.sort(scores)[::-1][:15], atol=1e-5)


def test_max_strategy_scores_best_positive_minus_best_negative(read_only_collection):  # noqa: F811
    open_search, ids, vectors, cats, metas = read_only_collection
    search = open_search()
    pos, neg = [3, 40], [12, 99]
    plain = search.search_examples(ids[pos].tolist(), [], 20, use_prototypes=False, strategy="max")
    best = (vectors @ vectors[pos].T).max(axis=1)
    best[pos] = -np.inf
    assert [r.image_id for r in plain.results] == ids[np.lexsort((ids, -best))[:20]].tolist()
    penalised = search.search_examples(ids[pos].tolist(), ids[neg].tolist(), 20, use_prototypes=False,
                                       strategy="max", negative_weight=1.0)
    penalty = (vectors @ vectors[neg].T).max(axis=1)
    score = (vectors @ vectors[pos].T).max(axis=1) - penalty
    score[pos + neg] = -np.inf
    # Each positive's top 1,000 candidates hold the true top 20 here: the answer is exact.
    assert [r.image_id for r in penalised.results] == ids[np.lexsort((ids, -score))[:20]].tolist()
    np.testing.assert_allclose([r.score for r in penalised.results], np.sort(score)[::-1][:20], atol=1e-5)
    second = search.search_examples(ids[pos].tolist(), ids[neg].tolist(), 10, use_prototypes=False, strategy="max",
                                    negative_weight=1.0, offset=10)
    assert [r.image_id for r in second.results] == [r.image_id for r in penalised.results][10:]  # one ranking


def test_examples_mix_uploads_and_stored_ids_and_a_negative_pushes_its_kind_down(sessions, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    search.build_database("folder", tmp_path / "f", progress=False)
    blue = png_bytes(Image.new("RGB", (32, 32), (10, 10, 230)))
    cyan = png_bytes(Image.new("RGB", (32, 32), (10, 230, 230)))  # half green, half blue
    stored_blue = search.search_similar(blue, k=1).results[0].image_id
    for strategy in ("mean", "max"):
        both = search.search_examples([cyan, stored_blue], [], 8, use_prototypes=False, strategy=strategy)
        assert stored_blue not in [r.image_id for r in both.results]
        assert {r.category for r in both.results} <= {"green", "blue"}
        green = png_bytes(Image.new("RGB", (32, 32), (10, 230, 10)))
        unlike_green = search.search_examples([cyan], [green], 8, use_prototypes=False, strategy=strategy)
        assert [r.category for r in unlike_green.results[:8]] == ["blue"] * 8
    with pytest.raises(InvalidQuery, match="at least one positive"):
        search.search_examples([], [blue])
    with pytest.raises(InvalidQuery, match=f"at most {MAX_EXAMPLES}"):
        search.search_examples([blue] * MAX_EXAMPLES, [blue])
    with pytest.raises(InvalidQuery, match="cancel"):
        search.search_examples([blue], [blue], negative_weight=1.0)
    with pytest.raises(InvalidQuery, match="strategy"):
        search.search_examples([blue], strategy="median")
    with pytest.raises(NotFound, match="image 999999"):
        search.search_examples([stored_blue, 999999])


def test_region_parsing():
    assert QueryEdit.parse() is None
    assert QueryEdit.parse("10,20,30,40") == QueryEdit((10, 20, 30, 40), False)
    assert QueryEdit.parse("0.5,0,0.5,0.5", 90, "horizontal") == QueryEdit((0.5, 0, 0.5, 0.5), True, 90, "horizontal")
    for crop, rotate, flip in [("1,2,3", 0, None), ("a,b,c,d", 0, None), ("0,0,0,5", 0, None), ("0,0,1.5,0.5", 0, None),
                               ("-1,0,5,5", 0, None), (None, 45, None), (None, 0, "diagonal")]:
        with pytest.raises(InvalidQuery):
            QueryEdit.parse(crop, rotate, flip)


def test_region_crops_rotates_and_flips_in_original_coordinates():
    from backend.embedding.decode import decode

    quadrants = Image.new("RGB", (2400, 1600))
    for n, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        quadrants.paste(colour, ((n % 2) * 1200, (n // 2) * 800, (n % 2 + 1) * 1200, (n // 2 + 1) * 800))
    decoded = decode(png_bytes(quadrants))
    assert decoded.image.size == (800, 533)  # decoding shrank it: the crop is still in the original's pixels
    top_right = QueryEdit.parse("1200,0,1200,800").apply(decoded)
    assert top_right.size == (400, 266) and set(top_right.get_flattened_data()) == {(0, 255, 0)}
    bottom_left = QueryEdit.parse("0.0,0.5,0.5,0.5", rotate=90).apply(decoded)
    assert bottom_left.size == (267, 400)  # rotated: tall
    colours = sorted(bottom_left.getcolors(), reverse=True)  # (count, colour): one row mixes two quarters
    assert colours[0][1] == (0, 0, 255) and colours[0][0] > 0.99 * 267 * 400
    half = QueryEdit.parse("0.0,0.0,1.0,0.5", flip="horizontal").apply(decoded)
    assert half.getpixel((10, 10)) == (0, 255, 0) and half.getpixel((790, 10)) == (255, 0, 0)
    with pytest.raises(InvalidQuery, match="outside the image"):
        QueryEdit.parse("5000,5000,10,10").apply(decoded)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_collection(search: ImageSearch) -> dict[str, Image.Image]:
    """Each of four real photos stored three times (as it is, mirrored, and slightly cropped), one category per photo;
    returns the photos."""
    from skimage import data

    photos = {}
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((320, 320))
        photos[name] = photo
        w, h = photo.size
        for variant in (photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                        photo.crop((w // 10, h // 10, w, h)).resize((320, 320))):
            search.add_image(png_bytes(variant), name)
    return photos


def composite(photos: dict[str, Image.Image]) -> Image.Image:
    """The four photos as the quarters of one picture, in PHOTOS order: top-left, top-right, bottom-left,
    bottom-right."""
    picture = Image.new("RGB", (640, 640))
    for n, name in enumerate(PHOTOS):
        picture.paste(photos[name], ((n % 2) * 320, (n // 2) * 320))
    return picture


@pytest.mark.slow
def test_a_quarter_of_a_composite_finds_that_photo_first(sessions, tmp_path):
    search = ImageSearch(sessions, create_embedder("efficientnet_lite0"), snapshot_dir=tmp_path / "snap")
    picture = png_bytes(composite(photo_collection(search)))
    for n, name in enumerate(PHOTOS):
        crop = f"{(n % 2) * 320},{(n // 2) * 320},320,320"
        hits = search.search_similar(picture, k=3, use_prototypes=False, edit=QueryEdit.parse(crop)).results
        assert [h.category for h in hits] == [name] * 3, (crop, hits)
