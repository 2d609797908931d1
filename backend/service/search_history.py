"""Keeping a collection's searches (backend.storage.history) and reading one back to run it again."""
import logging
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import sessionmaker

from backend.embedding.decode import decode, sha256
from backend.errors import NotFound
from backend.service.results import SearchResponse
from backend.storage import history
from backend.storage.tables import SearchRecord

log = logging.getLogger(__name__)


class SearchHistory:
    """A collection's search history: off until start() (what a server does unless HISTORY_ENABLED is off)."""

    def __init__(self, sessions: sessionmaker, model_name: str):
        self.sessions, self.model_name = sessions, model_name
        self.days: int | None = None  # retention; None: searches are not recorded

    def start(self, retention_days: int) -> None:
        """Record every search from now on, for `retention_days`."""
        self.days = retention_days

    def record(self, kind: str, params: dict, vectors: np.ndarray, uploaded, response: SearchResponse) -> None:
        """Keep a search (when the history is on); a failure to record is logged, never the search's."""
        if self.days is None:
            return
        sha, thumb = None, None
        if uploaded is not None:
            data = Path(uploaded).read_bytes() if isinstance(uploaded, (str, Path)) else uploaded
            picture = data if isinstance(data, PILImage.Image) else decode(data).image
            sha, thumb = (sha256(data) if isinstance(data, bytes) else None), history.thumbnail(picture)
        try:
            with self.sessions() as s, s.begin():
                history.record(s, kind=kind, model=self.model_name, params=params, vector=vectors,
                               query_sha256=sha, query_thumbnail=thumb, results=response.results,
                               timings_ms=response.timings_ms, retention_days=self.days)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("search not recorded in the history: %s", str(exc).splitlines()[0])

    def recorded(self, record_id: int, dim: int) -> tuple[dict, np.ndarray]:
        """A recorded search's parameters and its query's base vectors (n, dim); NotFound when it is not kept."""
        with self.sessions() as s:
            row = s.get(SearchRecord, record_id)
        if row is None or row.query_vector is None:
            raise NotFound(f"search {record_id} not found in the history")
        return row.params, np.frombuffer(row.query_vector, np.float32).reshape(-1, dim)
