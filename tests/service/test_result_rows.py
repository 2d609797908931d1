"""The rows a search shows of its hits are cached while the index is unchanged, and never outlive a change of it
(real PostgreSQL)."""
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.service.image_search import ImageSearch
from backend.storage.tables import Category
from tests.helpers import PixelEmbedder, png_bytes


@pytest.fixture
def collection(sessions, engine, tmp_path):
    """Six stored pictures in two categories; yields (search, statements that read the images table)."""
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    for n in range(6):
        blocks = np.random.default_rng(n).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        search.add_image(png_bytes(Image.fromarray(blocks).resize((32, 32))), f"c{n % 2}", original_name=f"p{n}")
    read_images = []

    def count(conn, cursor, statement, *args):
        if "FROM images" in statement:
            read_images.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    yield search, read_images
    sa.event.remove(engine, "before_cursor_execute", count)
    search.close()


def _query() -> bytes:
    return png_bytes(Image.new("RGB", (32, 32), (120, 80, 200)))


def test_a_search_shown_before_reads_no_rows_again(collection):
    search, read_images = collection
    first = search.search_similar(_query(), k=6, use_prototypes=False).results
    before = len(read_images)
    again = search.search_similar(_query(), k=6, use_prototypes=False).results
    assert len(read_images) == before and before >= 1
    assert [(r.image_id, r.file_name, r.category) for r in again] == [(r.image_id, r.file_name, r.category)
                                                                     for r in first]


def test_a_change_of_the_index_empties_the_cache(collection, sessions):
    search, read_images = collection
    first = search.search_similar(_query(), k=6, use_prototypes=False).results
    gone, renamed = first[0], first[1]
    # Another process deletes one image and renames a category; live sync applies it to the index (a sync)
    with sessions() as s, s.begin():
        s.execute(sa.text("DELETE FROM images WHERE id = :i"), {"i": gone.image_id})
        s.execute(sa.update(Category).where(Category.id == renamed.category_id).values(name="renamed"))
    search.manager.sync([gone.image_id])
    before = len(read_images)
    after = search.search_similar(_query(), k=6, use_prototypes=False).results
    assert len(read_images) > before  # read again
    assert gone.image_id not in {r.image_id for r in after}
    assert {r.category for r in after if r.category_id == renamed.category_id} == {"renamed"}
