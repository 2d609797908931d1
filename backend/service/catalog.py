"""What the API shows of a collection without searching: counts, images, categories, the history. Read-only, so
routes never open a session or write SQL themselves."""
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.errors import NotFound
from backend.storage import history
from backend.storage import images as image_store
from backend.storage.tables import Category, SearchRecord


class Catalog:
    """Read-only answers about one collection (the one `sessions` lead to)."""

    def __init__(self, sessions: sessionmaker, written: Callable[[], None] = lambda: None):
        self.sessions = sessions
        self.written = written  # returns once the searches answered so far are in the history

    def reachable(self) -> bool:
        """Whether the database answers now."""
        try:
            with self.sessions() as s:
                return s.execute(sa.text("SELECT 1")).scalar() == 1
        except sa.exc.SQLAlchemyError:
            return False

    def counts(self) -> dict:
        """Images, categories, and vectors and prototypes per model (backend.storage.images.counts)."""
        with self.sessions() as s:
            return image_store.counts(s)

    def image(self, image_id: int, with_data: bool = False):
        """(the stored image, its category's name); NotFound when there is none."""
        with self.sessions() as s:
            row = image_store.get_image(s, image_id, with_data)
        if row is None:
            raise NotFound(f"image {image_id} not found")
        return row

    def category_name(self, category_id: int) -> str:
        """A category's name; NotFound when there is none."""
        with self.sessions() as s:
            found = s.get(Category, category_id)
        if found is None:
            raise NotFound(f"category {category_id} not found")
        return found.name

    def categories(self) -> list[tuple[int, str, int, bool]]:
        """(id, name, images, automatic) of every category."""
        with self.sessions() as s:
            return image_store.list_categories(s)

    def category_images(self, category_id: int, offset: int, limit: int):
        """(the category's image count, a page of (image, category name)); NotFound for an unknown category."""
        with self.sessions() as s:
            if s.get(Category, category_id) is None:
                raise NotFound(f"category {category_id} not found")
            return image_store.category_images(s, category_id, offset, limit)

    def history_page(self, offset: int, limit: int) -> tuple[int, list[SearchRecord]]:
        """(searches kept, a page of them, newest first)."""
        self.written()
        with self.sessions() as s:
            return history.page(s, offset, limit)

    def history_thumbnail(self, record_id: int) -> bytes:
        """The thumbnail of a recorded search's uploaded query; NotFound when it has none."""
        self.written()
        with self.sessions() as s:
            row = s.get(SearchRecord, record_id)
        if row is None or row.query_thumbnail is None:
            raise NotFound(f"no thumbnail for search {record_id}")
        return row.query_thumbnail

    def analytics(self, days: int) -> dict:
        """Searches per day, latency percentiles, top categories and images (backend.storage.history.analytics)."""
        self.written()
        with self.sessions() as s:
            return history.analytics(s, days)
