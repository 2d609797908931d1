"""The Python API: `ImageSearch` ties the database, the embedder and the index together."""
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Union

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import sessionmaker

from backend.embedding.decode import DecodedImage, decode, sha256
from backend.embedding.models import Embedder
from backend.embedding.query_edits import QueryEdit
from backend.errors import InvalidImage, NotFound
from backend.pipeline.consistency import Report
from backend.pipeline.datasets import Item
from backend.pipeline.ingest import IngestReport, ingest
from backend.pipeline.populate import populate, select
from backend.search import duplicates
from backend.search.examples import check_counts
from backend.service import duplicate_review, lookups, planner
from backend.service.query_confidence import QueryConfidence
from backend.service.catalog import Catalog
from backend.service.index_manager import IndexManager
from backend.service.live_sync import LiveSync
from backend.service.requests import SearchRequest, default_top_categories
from backend.service.results import AddResult, SearchResponse, SearchResult
from backend.service.metadata_keys import MetadataKeys
from backend.service.result_rows import ResultRows
from backend.service.search_history import SearchHistory
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.collections import DEFAULT, snapshot_dir_of
from backend.storage.retry import run_transaction
from backend.storage.tables import Collection, Image

log = logging.getLogger(__name__)
ImageInput = Union[PILImage.Image, bytes, str, Path]
Example = Union[ImageInput, int]  # an image, or a stored image's id


def _is_id(example: Example) -> bool:
    return isinstance(example, int) and not isinstance(example, bool)


class ImageSearch:
    """Search a PostgreSQL-backed collection by image. Open with `ImageSearch.open()`."""

    def __init__(self, sessions: sessionmaker, embedder: Embedder, index_type: str = "flatip",
                 snapshot_dir: Path | None = None, batch_size: int = 32):
        from backend.config import settings

        self.sessions, self.embedder, self.batch_size = sessions, embedder, batch_size
        with sessions() as s:  # the collection is the one the sessions' search path leads to (backend.storage.collections)
            self.schema = s.scalar(sa.text("SELECT current_schema()"))
            self.collection = s.scalar(sa.select(Collection.name).where(Collection.schema == self.schema)) or DEFAULT
        self.snapshot_base = Path(snapshot_dir or settings.snapshot_dir)  # every collection's snapshots are under it
        snapshot_dir = snapshot_dir_of(self.snapshot_base, self.collection)
        self.dropped = False  # set when the collection is deleted (by any process): serve it no more
        # The index's consistency is the manager's: its locks, its head and its count of changes.
        self.manager = IndexManager(sessions, embedder.name, embedder.dim, index_type, snapshot_dir)
        self.batcher = None  # see start_batching
        self.confidence = QueryConfidence(sessions, embedder)  # what "no close match" means for this collection
        self.live_sync, self._own_live_sync = None, False  # see start_live_sync
        self.history = SearchHistory(sessions, embedder.name)  # off until start_history
        self.catalog = Catalog(sessions, self.history.flush)  # what routes show without searching
        self.keys = MetadataKeys(sessions, lambda: self.manager.changes)  # stale after the index changes
        self.rows = ResultRows(sessions, lambda: self.manager.changes)  # what results show, as of the index
        self.manager.load_or_build()
        self._follow_head()

    @classmethod
    def open(cls, model_name: str | None = None, index_type: str | None = None, load_model: bool = True,
             collection: str | None = None, sessions: sessionmaker | None = None) -> "ImageSearch":
        """Open a collection (default: COLLECTION's) of the configured (or embedded) database, or the one `sessions`
        lead to, with `model_name`, else the model backend.service.model_choice picks, and FAISS_INDEX_TYPE; the model loads
        now unless load_model is False."""
        from backend.config import settings
        from backend.service.model_choice import ModelChoice, choose_model, load_embedder
        from backend.storage.sessions import session_factory

        sessions = sessions or session_factory(collection)
        choice = ModelChoice(model_name, "caller", "asked for") if model_name else choose_model(sessions)
        embedder = load_embedder(choice, sessions, load=load_model)
        return cls(sessions, embedder, index_type or settings.faiss_index_type, batch_size=settings.batch_size)

    def unserved_notice(self) -> str | None:
        """A warning when this model has no vectors but other models do (see model_choice.unserved_notice)."""
        from backend.service.model_choice import unserved_notice

        with self.sessions() as s:
            return unserved_notice(dict(image_store.models_with_vectors(s)), self.embedder.name)

    @property
    def lock(self) -> threading.RLock:
        """Held by searches: the index (and a derived model's head) change in memory only under it."""
        return self.manager.lock

    @property
    def index(self):
        return self.manager.index

    def memory_bytes(self) -> int:
        """Bytes the collection's index holds in memory (vectors, graph or lists, prototypes)."""
        return self.index.nbytes()

    @property
    def index_source(self) -> str:
        """How the index came to be: 'snapshot', 'rebuilt', or 'rebuilt: snapshot was <why>, moved to <file>'."""
        return self.manager.source

    # -- search -----------------------------------------------------------------------------------
    def embed(self, image: ImageInput) -> np.ndarray:
        """The query's vector (d,), from a PIL image, encoded bytes or a file path; batched with concurrent queries
        once start_batching() was called."""
        return self.embed_query(image)[0]

    def embed_query(self, image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
        """(the query's vector (d,), its base model's vector): the same for a model that is not derived."""
        base = self._embed_base(image)
        with self.manager.lock:
            return self.to_index_space(base), base

    def _embed_base(self, image: ImageInput, edit: QueryEdit | None = None, keep: list | None = None) -> np.ndarray:
        """The query's base model vector, edited first (a derived model's head is applied under the lock:
        _to_index_space); the decoded, unedited picture is appended to `keep` when given (for the history)."""
        def picture() -> PILImage.Image:
            if isinstance(image, PILImage.Image):
                decoded = DecodedImage(image.convert("RGB"), image.width, image.height, "PIL")
            else:
                decoded = decode(Path(image).read_bytes() if isinstance(image, (str, Path)) else image)
            if keep is not None:
                keep.append(decoded.image)
            return edit.apply(decoded) if edit is not None else decoded.image

        batcher = self.batcher  # close() may set it to None meanwhile
        return batcher.embed(picture) if batcher is not None else self.embedder.source.embed([picture()])[0]

    def to_index_space(self, base: np.ndarray) -> np.ndarray:
        """Base vectors (d,) or (n, d) as the index holds vectors: through the head the index was built with (a
        derived model's; call with the lock held, under which index and head are swapped together)."""
        if self.embedder.source is self.embedder:  # not a derived model
            return base
        self._follow_head()
        return self.embedder.head.apply(base[None, :])[0] if base.ndim == 1 else self.embedder.head.apply(base)

    def _follow_head(self) -> None:
        """Queries go through the head the index holds vectors of (a derived model's): read from the manager after
        it changed the index, and under the lock before each query."""
        head = self.manager.head
        if head is not None and head is not self.embedder.head:  # the index moved to another head version
            self.embedder.head = head
            self.confidence.reset()

    def no_match_threshold(self) -> float | None:
        """The best prototype similarity under which a query is "no close match" (backend.service.query_confidence)."""
        return self.confidence.threshold(self.index)

    def confidence_of(self, vector: np.ndarray, base: np.ndarray | None = None, ranking=None):
        """The Confidence of a query (backend.service.query_confidence.QueryConfidence.of); call with the lock held."""
        return self.confidence.of(self.index, vector, base, ranking)

    def start_batching(self, max_batch: int, preparing: int) -> None:
        """Embed queries through a QueryBatcher from now on (what a server does): concurrent queries share forward
        passes of up to max_batch images, and at most `preparing` decode at once."""
        from backend.embedding.batching import QueryBatcher

        self.batcher = QueryBatcher(self.embedder.source, max_batch, preparing)  # the head runs in embed_query

    def start_live_sync(self, live_sync: LiveSync | None = None) -> None:
        """Keep the index in step with every process writing to the database from now on (backend.service.live_sync):
        through the process's LiveSync when a server hands one in, else a listener of this collection's own."""
        from backend.config import settings

        if live_sync is None:
            live_sync, self._own_live_sync = LiveSync(self.sessions.kw["bind"], settings.db_timeout).start(), True
        self.live_sync = live_sync
        live_sync.add(self)

    @property
    def listener(self):
        """The change listener keeping this collection in step (backend.storage.notify), or None."""
        return self.live_sync.listener if self.live_sync is not None else None

    def sync_status(self) -> dict | None:
        """What live sync has applied and how far behind it is (see SyncState), or None when it is off."""
        live_sync = self.live_sync  # close() may clear it meanwhile
        return live_sync.status() if live_sync is not None else None

    def apply_changes(self, changes) -> bool:
        """Bring the index in line with the database for this collection's announced changes: those images, re-read
        (so a change applied twice or late is harmless); everything on a 'resync'. Returns whether the collection
        now has another model (whoever serves it opens it anew)."""
        if any(c.what == "dropped" for c in changes):
            self.dropped = True
            return False
        switched = [c.model for c in changes if c.what == "model"]
        mine = [c for c in changes if c.model in (None, self.embedder.name) and c.what != "model"]
        if any(c.what == "resync" for c in mine):
            self.manager.sync()
            self._follow_head()
            self.confidence.reset()
        elif mine:  # with no ids (a prototype rebuild) this reloads the prototypes alone
            self.manager.sync(sorted({i for c in mine for i in c.ids}))
            self._follow_head()
        return bool(switched) and switched[-1] != self.embedder.name

    def search(self, request: SearchRequest, positives: list[Example], negatives: list[Example] = ()) -> SearchResponse:
        """The request's page of results more like the positive examples and less like the negative ones
        (backend.search.examples): each an image or a stored image's id (stored examples are left out of the
        results); the request's edit applies to every positive image. Every entry point comes here."""
        check_counts(len(positives), len(negatives))
        stored_ids = [e for e in (*positives, *negatives) if _is_id(e)]
        started = time.perf_counter()
        stored = dict(zip(*lookups.stored_bases(self.sessions, self.embedder, stored_ids)))
        uploaded, seen = next((e for e in positives if not _is_id(e)), None), []  # seen: for the history's thumbnail
        bases = [stored[e] if _is_id(e) else self._embed_base(e, request.edit if n < len(positives) else None,
                                                              seen if e is uploaded else None)
                 for n, e in enumerate((*positives, *negatives))]
        embed_ms = (time.perf_counter() - started) * 1000
        negative = np.stack(bases[len(positives):]) if negatives else np.zeros((0, len(bases[0])), np.float32)
        response = planner.execute(self, request, np.stack(bases[:len(positives)]), negative, exclude=set(stored))
        if len(stored) < len(bases):  # some example was embedded here
            response.timings_ms = {"embedding": round(embed_ms, 2), **response.timings_ms}
        params = {**request.to_params(), "positives": len(positives), "stored_ids": stored_ids}
        self.history.record("upload" if uploaded is not None else "stored", params, np.stack(bases), uploaded,
                            response, picture=(seen or [None])[0])
        return response

    def start_history(self, retention_days: int) -> None:
        """Record every search from now on in PostgreSQL, for `retention_days` (backend.storage.history): what the
        server does unless HISTORY_ENABLED is off."""
        self.history.start(retention_days)

    def search_similar(self, image: ImageInput, k: int | None = None, **options) -> SearchResponse:
        """Embed a query image and return its k most similar stored images; `options` are SearchRequest's (edit:
        crop, rotate, flip it first; offset, min_score, where, collapse ...)."""
        return self.search(_request(k, options), [image])

    def search_by_id(self, image_id: int, k: int | None = None, **options) -> SearchResponse:
        """Search with a stored image's own vector ("more like this"); the image itself is left out."""
        return self.search(_request(k, options), [image_id])

    def search_examples(self, positives: list[Example], negatives: list[Example] = (), k: int | None = None,
                        **options) -> SearchResponse:
        """More like the positive examples, less like the negative ones (see search)."""
        return self.search(_request(k, options), positives, negatives)

    def search_vector(self, vector: np.ndarray, k: int | None = None, **options) -> SearchResponse:
        """Search for one query vector (d,) as the index holds them (for a derived model: through its head)."""
        return planner.execute(self, _request(k, options), vector[None, :],
                               np.zeros((0, vector.shape[0]), np.float32), in_index_space=True)

    def run_again(self, record_id: int) -> SearchResponse:
        """A recorded search, run again now with its query's vectors and parameters (and recorded too)."""
        params, vectors = self.history.recorded(record_id, self.embedder.source.dim)
        request = SearchRequest.from_params(params)
        response = planner.execute(self, request, vectors[:params["positives"]], vectors[params["positives"]:],
                                   exclude=set(params["stored_ids"]))
        self.history.record("rerun", {**params, "of": record_id}, vectors, None, response)
        return response

    def duplicate_groups(self, threshold: float = duplicates.DEFAULT_THRESHOLD) -> list[list[SearchResult]]:
        """Groups of near-duplicate images (at least `threshold` alike), largest first, leaving out pairs a person
        already decided about (backend.service.duplicate_review)."""
        return duplicate_review.find_groups(self, threshold)

    def decide_duplicates(self, image_ids: list[int], decision: str, keep: int | None = None) -> int:
        """A person's decision about a group: keep_one (the others are deleted), keep_all or not_duplicates (the
        group's pairs are not offered again). Returns how many images were deleted or pairs recorded."""
        doomed = duplicate_review.to_delete(self.sessions, image_ids, decision, keep)
        if doomed is None:
            return duplicate_review.record(self.sessions, image_ids, decision)
        return self.delete_images(doomed)

    def metadata_keys(self) -> list[dict]:
        """The filterable metadata keys stored, with their values or ranges (backend.service.metadata_keys)."""
        return self.keys.summary()

    def rank_prototypes(self, image: ImageInput, top_categories: int | None = None) -> SearchResponse:
        """Stage 1 alone: the categories closest to the query image (default: PROTOTYPE_LIMIT of them)."""
        started = time.perf_counter()
        base = self._embed_base(image)
        embed_ms = (time.perf_counter() - started) * 1000
        response = planner.rank_categories(self, base, top_categories or default_top_categories())
        response.timings_ms = {"embedding": round(embed_ms, 2), **response.timings_ms}
        return response

    # -- writes -----------------------------------------------------------------------------------
    def add_image(self, image: bytes | str | Path, category: str, original_name: str | None = None,
                  metadata: dict | None = None) -> AddResult:
        """Store, embed and index one image under a category (created if new); a duplicate returns its id."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        if not isinstance(data, bytes):
            raise InvalidImage("add_image takes encoded image bytes or a file path")
        if not category or not str(category).strip():
            raise InvalidImage("a category is required")
        name = original_name or (Path(image).name if isinstance(image, (str, Path)) else None)
        item = Item(category=str(category).strip(), label=None, original_name=name or "upload", source="upload",
                    split=None, read=lambda: data, metadata=metadata)
        report = self._ingest([item], strict=True)  # bytes that do not decode raise their error; nothing is stored
        with self.sessions() as s:
            image_id = s.scalar(sa.select(Image.id).where(Image.sha256 == sha256(data)))
        return AddResult(image_id=image_id, duplicate=not report.image_ids)

    def delete_image(self, image_id: int) -> None:
        """Delete an image, its vectors and its share of its category's prototype."""
        if not self.delete_images([image_id]):
            raise NotFound(f"image {image_id} not found")

    def delete_images(self, image_ids: list[int]) -> int:
        """Delete images (those stored), their vectors and their shares of prototypes; returns how many."""
        deleted = run_transaction(self.sessions, lambda s: image_store.delete_images(s, image_ids))
        self._synced(image_ids)
        return deleted

    def build_database(self, dataset: str = "folder", data_dir: Path | None = None, split: str = "train",
                       num_images: int | None = None, image_dir: Path | None = None, progress: bool = True,
                       categories: str = "labels") -> IngestReport:
        """Load a dataset (cifar10, fashion-mnist, folder or a CSV), embed and index it: the same populate as
        `python -m backend populate` (backend.pipeline.populate; categories: labels, auto or auto:K)."""
        selection = select(dataset, split, data_dir, image_dir, num_images, categories)
        report = populate(self.sessions, self.embedder, selection, self.batch_size, progress=progress)
        if report.clusters_made is not None:
            self.refresh()  # images moved into the automatic categories
        else:
            self._synced(report.ingest.image_ids)
        return report.ingest

    def recluster(self, k: int | None = None) -> int:
        """Group the images no person categorised into k automatic categories (backend.pipeline.recluster; k from the
        collection's size by default) and index them; returns how many clusters were made."""
        from backend.pipeline.recluster import recluster

        with self.sessions() as s, s.begin():
            made = recluster(s, self.embedder.name, k)
        self.refresh()
        return made

    def refresh(self) -> tuple[int, int]:
        """Pick up what other processes added or deleted; returns (added, removed)."""
        changed = self.manager.sync()
        self._follow_head()
        self.confidence.reset()  # images may have moved between categories (a recluster)
        return changed

    def rebuild(self) -> None:
        """Recompute prototypes and rebuild the index from PostgreSQL, then snapshot it; searches go on meanwhile."""
        self.manager.rebuild(save=True)
        self._follow_head()

    def rebuild_prototypes(self) -> None:
        """Recompute every prototype exactly in PostgreSQL and load them into the index."""
        with self.sessions() as s, s.begin():
            prototype_store.rebuild_prototypes(s, self.embedder.name)
        self.manager.sync([])
        self._follow_head()

    def check(self) -> Report:
        """Compare the live index with PostgreSQL, and PostgreSQL's vectors and prototypes with each other; a write
        in flight (stored, not yet indexed) shows as a difference, so check a quiet service or check again."""
        return self.manager.check()

    def save_snapshot(self) -> None:
        """Write the index snapshot now (it is otherwise written on rebuild)."""
        self.manager.save_snapshot()

    def close(self) -> None:
        """Stop listening and batching queries, and snapshot the index if writes changed it since the last
        snapshot (and the collection was not deleted), so the next start loads it."""
        live_sync, self.live_sync = self.live_sync, None
        if live_sync is not None:
            live_sync.remove(self)
            if self._own_live_sync:
                live_sync.stop()
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        self.history.close()
        self.manager.close(save=not self.dropped)  # a deleted collection's index is not snapshotted

    def _ingest(self, items: list[Item], progress: bool = False, strict: bool = False) -> IngestReport:
        report = ingest(self.sessions, items, self.embedder, batch_size=self.batch_size, progress=progress,
                        strict=strict)
        self._synced(report.image_ids)
        return report

    def _synced(self, image_ids) -> None:
        """Bring the index in step with writes made here to these images."""
        self.manager.sync(image_ids)
        self._follow_head()


def _request(k: int | None, options: dict) -> SearchRequest:
    """A SearchRequest of the Python API's keyword arguments (SearchRequest's fields; `request` to start from one)."""
    request = options.pop("request", None) or SearchRequest()
    return replace(request, **({"k": k} if k is not None else {}), **options)
