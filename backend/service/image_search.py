"""The Python API: `ImageSearch` ties the database, the embedder and the index together."""
import io
import itertools
import logging
import math
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Union

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import sessionmaker

from backend.embedding.decode import DecodedImage, decode, sha256
from backend.embedding.models import Embedder
from backend.embedding.query_edits import QueryEdit
from backend.errors import InvalidImage, InvalidQuery, NotFound
from backend.pipeline.consistency import Report, check
from backend.pipeline.datasets import Item, load_dataset, select_balanced
from backend.pipeline.ingest import IngestReport, ingest
from backend.search import duplicates
from backend.search.confidence import Calibration, assess
from backend.search.examples import (
    DEFAULT_STRATEGY,
    NEGATIVE_WEIGHT,
    STRATEGIES,
    InvalidExamples,
    best_of,
    check_counts,
    mean_query,
    penalise,
    unit,
)
from backend.search.partition import Hits
from backend.service.base_space import BaseSpace
from backend.service.index_manager import IndexManager
from backend.service.results import MAX_DEPTH, AddResult, SearchResponse, SearchResult
from backend.storage import decisions, filters, history
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.collections import DEFAULT, snapshot_dir_of
from backend.storage.filters import Condition
from backend.storage.tables import Category, Collection, Embedding, Image, SearchRecord

log = logging.getLogger(__name__)
ImageInput = Union[PILImage.Image, bytes, str, Path]
Example = Union[ImageInput, int]  # an image, or a stored image's id
KEYS_MAX_AGE = 60.0  # seconds a summary of the metadata keys is kept (it reads every image's metadata) ...
KEYS_MIN_AGE = 5.0  # ... and at least this long, whatever is written meanwhile
COLLAPSE_FETCH = 3  # results fetched per result wanted when near-duplicates are collapsed
POST_FILTER_MAX_FETCH = 50_000  # results a post-filter fetches at most before it searches among every match


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
        self.on_switch = None  # called with this ImageSearch when the collection switches models (backend.pipeline.reembed)
        self._lock = threading.RLock()  # searches hold it; the index changes in memory only under it
        self._sync_lock = threading.RLock()  # one sync, rebuild, check or snapshot at a time; taken before _lock
        self.manager = IndexManager(sessions, embedder.name, embedder.dim, index_type, snapshot_dir,
                                    guard=self._lock, on_head=self._use_head)
        self.batcher = None  # see start_batching
        self._calibration = Calibration()  # what "no close match" means for this collection (backend.search.confidence)
        self._base_space = BaseSpace(sessions, embedder.source.name, embedder.source.dim) \
            if embedder.source is not embedder else None  # a derived model's (backend.embedding.projection)
        self.listener = None  # see start_live_sync
        self.history_days = None  # see start_history
        self._write_count = itertools.count(1)
        self._writes = 0  # writes made or applied here: a cached summary of metadata keys older than the last is stale
        self._keys = None  # (writes, monotonic time, summary) of metadata_keys
        self._keys_lock = threading.Lock()
        self.manager.load_or_build()

    @classmethod
    def open(cls, model_name: str | None = None, index_type: str | None = None, load_model: bool = True,
             collection: str | None = None, sessions: sessionmaker | None = None) -> "ImageSearch":
        """Open a collection (default: COLLECTION's) of the configured (or embedded) database, or the one `sessions`
        lead to, with `model_name`, else the model backend.service.model_choice picks, and FAISS_INDEX_TYPE; the model loads
        now unless load_model is False."""
        from backend.config import settings
        from backend.service.model_choice import (
            ModelChoice,
            choose_model,
            load_embedder,
        )
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
    def index(self):
        return self.manager.index

    def memory_bytes(self) -> int:
        """Bytes the collection's index holds in memory (vectors, graph or lists, prototypes)."""
        return self.index.nbytes()

    @property
    def index_source(self) -> str:
        """How the index came to be: 'snapshot', 'rebuilt', or after a snapshot that could not be trusted,
        'rebuilt: snapshot was <what was wrong>, moved to <file>'."""
        return self.manager.source

    # -- search -----------------------------------------------------------------------------------
    def embed(self, image: ImageInput) -> np.ndarray:
        """The query's vector (d,), from a PIL image, encoded bytes or a file path; batched with concurrent queries
        once start_batching() was called."""
        return self.embed_query(image)[0]

    def embed_query(self, image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
        """(the query's vector (d,), its base model's vector): the same for a model that is not derived."""
        base = self._embed_base(image)
        with self._lock:
            return self._to_index_space(base), base

    def _embed_base(self, image: ImageInput, edit: QueryEdit | None = None) -> np.ndarray:
        """The query's base model vector, edited first (a derived model's head is applied under the lock:
        _to_index_space)."""
        def picture() -> PILImage.Image:
            if isinstance(image, PILImage.Image):
                decoded = DecodedImage(image.convert("RGB"), image.width, image.height, "PIL")
            else:
                decoded = decode(Path(image).read_bytes() if isinstance(image, (str, Path)) else image)
            return edit.apply(decoded) if edit is not None else decoded.image

        batcher = self.batcher  # close() may set it to None meanwhile
        return batcher.embed(picture) if batcher is not None else self.embedder.source.embed([picture()])[0]

    def _to_index_space(self, base: np.ndarray) -> np.ndarray:
        """Base vectors (d,) or (n, d) as the index holds vectors: through the head the index was built with (a
        derived model's; call with the lock held, under which index and head are swapped together)."""
        if self._base_space is None:
            return base
        return self.embedder.head.apply(base[None, :])[0] if base.ndim == 1 else self.embedder.head.apply(base)

    def _use_head(self, head) -> None:
        """The index now holds vectors of this head version (a derived model's): queries go through it from now on."""
        self.embedder.head = head
        self._recalibrate()

    def _recalibrate(self) -> None:
        """Draw "no close match" again at the next query: the collection's members moved."""
        self._calibration.reset()
        if self._base_space is not None:
            self._base_space.reset()

    def no_match_threshold(self) -> float | None:
        """The best prototype similarity under which a query is "no close match" (backend.search.confidence); a derived
        model's is in its base model's space (BaseSpace), measured when its head was trained."""
        if self._base_space is not None:
            return self.embedder.head.report.get("base_no_match_threshold")
        return self._calibration.current(self.index)

    def confidence_of(self, vector: np.ndarray, base: np.ndarray | None = None, ranking=None):
        """The Confidence of a query (backend.search.confidence), or None without prototypes (or, for a derived model,
        without the base vector); `ranking` is stage 1's (category, similarity) list over every category, when a
        search made one. Call with the lock held."""
        if self._base_space is not None:
            sims = self._base_space.similarities(base, self.index) if base is not None else np.zeros(0)
        else:
            sims = np.array([sim for _, sim in ranking]) if ranking is not None else \
                self.index.rank_prototypes(vector[None, :])[1][0]
        return assess(sims, self.no_match_threshold())

    def start_batching(self, max_batch: int, preparing: int) -> None:
        """Embed queries through a QueryBatcher from now on (what a server does): concurrent queries share forward
        passes of up to max_batch images, and at most `preparing` decode at once."""
        from backend.embedding.batching import QueryBatcher

        self.batcher = QueryBatcher(self.embedder.source, max_batch, preparing)  # the head runs in embed_query

    def start_live_sync(self) -> None:
        """Keep the index in step with every process writing to the database from now on (backend.storage.notify):
        what they commit is searchable here within about a second."""
        from backend.config import settings
        from backend.storage.notify import ChangeListener

        self.listener = ChangeListener(self.sessions.kw["bind"], self._apply_changes, self.refresh,
                                       settings.db_timeout).start()

    def sync_status(self) -> dict | None:
        """What live sync has applied and how far behind it is (see SyncState), or None when it is off."""
        listener = self.listener  # close() may clear it meanwhile
        return listener.state.as_dict() if listener is not None else None

    def _apply_changes(self, changes) -> None:
        """Bring the index in line with the database for announced changes: those images, re-read (so a change
        applied twice or late is harmless); everything on a 'resync'."""
        ours = [c for c in changes if c.schema in (None, self.schema)]
        if any(c.what == "dropped" for c in ours):
            self.dropped = True
            return
        switched = [c.model for c in ours if c.what == "model"]
        if switched and switched[-1] != self.embedder.name and self.on_switch is not None:
            self.on_switch(self)  # the collection now has another model: whoever serves it opens it anew
        mine = [c for c in ours if c.model in (None, self.embedder.name) and c.what != "model"]
        if not mine:
            return
        self._wrote()
        with self._sync_lock:
            if any(c.what == "resync" for c in mine):
                self.manager.sync()
                self._recalibrate()
            else:  # with no ids (a prototype rebuild) this reloads the prototypes alone
                self.manager.sync(sorted({i for c in mine for i in c.ids}))

    def search_similar(self, image: ImageInput, k: int = 10, use_prototypes: bool = True, top_categories: int = 3,
                       category: str | int | None = None, offset: int = 0, min_score: float | None = None,
                       where: list[Condition] | None = None, edit: QueryEdit | None = None,
                       collapse: float | None = None) -> SearchResponse:
        """Embed a query image (edited first: cropped, rotated, flipped) and return its k most similar stored
        images (after the first `offset`, down to min_score, among those whose metadata match `where`; with
        `collapse`, without near-duplicates of a result ranked before)."""
        return self.search_examples([image], [], k, use_prototypes, top_categories, category, offset, min_score, where,
                                    edit=edit, collapse=collapse)

    def search_by_id(self, image_id: int, k: int = 10, use_prototypes: bool = True, top_categories: int = 3,
                     category: str | int | None = None, offset: int = 0, min_score: float | None = None,
                     where: list[Condition] | None = None) -> SearchResponse:
        """Search with a stored image's own vector ("more like this"); the image itself is left out."""
        return self.search_examples([image_id], [], k, use_prototypes, top_categories, category, offset, min_score,
                                    where)

    def search_examples(self, positives: list[Example], negatives: list[Example] = (), k: int = 10,
                        use_prototypes: bool = True, top_categories: int = 3, category: str | int | None = None,
                        offset: int = 0, min_score: float | None = None, where: list[Condition] | None = None,
                        strategy: str = DEFAULT_STRATEGY, negative_weight: float = NEGATIVE_WEIGHT,
                        edit: QueryEdit | None = None, collapse: float | None = None) -> SearchResponse:
        """More like the positive examples, less like the negative ones (backend.search.examples): each an image or a
        stored image's id (stored examples are left out of the results); `edit` applies to every positive image;
        `collapse`, a similarity, leaves out results at least that alike to a result ranked before them."""
        check_counts(len(positives), len(negatives))
        if strategy not in STRATEGIES:
            raise InvalidExamples(f"strategy is one of {', '.join(STRATEGIES)}, not {strategy!r:.40}")
        params = {"k": k, "offset": offset, "use_prototypes": use_prototypes, "top_categories": top_categories,
                  "category": category, "min_score": min_score, "where": [asdict(c) for c in where or []],
                  "strategy": strategy, "negative_weight": negative_weight, "collapse": collapse,
                  "positives": len(positives), "stored_ids": [e for e in (*positives, *negatives) if _is_id(e)],
                  "edit": asdict(edit) if edit is not None else None}
        started = time.perf_counter()
        stored = dict(zip(*self._stored_bases([e for e in (*positives, *negatives) if _is_id(e)])))
        bases = [stored[e] if _is_id(e) else self._embed_base(e, edit if n < len(positives) else None)
                 for n, e in enumerate((*positives, *negatives))]
        embed_ms = (time.perf_counter() - started) * 1000
        negative = np.stack(bases[len(positives):]) if negatives else np.zeros((0, len(bases[0])), np.float32)
        response = self._search(np.stack(bases[:len(positives)]), negative, k, use_prototypes, top_categories,
                                category, offset, min_score, where, strategy, negative_weight, exclude=set(stored),
                                collapse=collapse)
        if len(stored) < len(bases):  # some example was embedded here
            response.timings_ms = {"embedding": round(embed_ms, 2), **response.timings_ms}
        uploaded = next((e for e in positives if not _is_id(e)), None)
        self._record("upload" if uploaded is not None else "stored", params, np.stack(bases), uploaded, response)
        return response

    def start_history(self, retention_days: int) -> None:
        """Record every search from now on in PostgreSQL, for `retention_days` (backend.storage.history): what the server
        does unless HISTORY_ENABLED is off."""
        self.history_days = retention_days

    def _record(self, kind: str, params: dict, vectors: np.ndarray, uploaded, response: SearchResponse) -> None:
        """Keep a search in the history (when it is on); a failure to record is logged, never the search's."""
        if self.history_days is None:
            return
        sha, thumb = None, None
        if uploaded is not None:
            data = Path(uploaded).read_bytes() if isinstance(uploaded, (str, Path)) else uploaded
            picture = data if isinstance(data, PILImage.Image) else decode(data).image
            sha, thumb = (sha256(data) if isinstance(data, bytes) else None), history.thumbnail(picture)
        try:
            with self.sessions() as s, s.begin():
                history.record(s, kind=kind, model=self.embedder.name, params=params, vector=vectors,
                               query_sha256=sha, query_thumbnail=thumb, results=response.results,
                               timings_ms=response.timings_ms, retention_days=self.history_days)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("search not recorded in the history: %s", str(exc).splitlines()[0])

    def run_again(self, record_id: int) -> SearchResponse:
        """A recorded search, run again now with its query's vectors and parameters (and recorded too)."""
        with self.sessions() as s:
            row = s.get(SearchRecord, record_id)
        if row is None or row.query_vector is None:
            raise NotFound(f"search {record_id} not found in the history")
        p = row.params
        vectors = np.frombuffer(row.query_vector, np.float32).reshape(-1, self.embedder.source.dim)
        where = [Condition(c["key"], c["op"], tuple(c["value"]) if isinstance(c["value"], list) else c["value"])
                 for c in p["where"]]
        response = self._search(vectors[:p["positives"]], vectors[p["positives"]:], p["k"], p["use_prototypes"],
                                p["top_categories"], p["category"], p["offset"], p["min_score"], where, p["strategy"],
                                p["negative_weight"], exclude=set(p["stored_ids"]), collapse=p["collapse"])
        self._record("rerun", {**p, "of": record_id}, vectors, None, response)
        return response

    def _stored_bases(self, image_ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
        """The base model vectors of stored images (a derived model's stored vectors may be of a newer head than the
        index's: the head is applied under the lock); NotFound for an id without this model's vector."""
        if not image_ids:
            return [], []
        wanted = sorted(set(image_ids))
        with self.sessions() as s:
            found = dict(s.execute(sa.select(Embedding.image_id, Embedding.vector).where(
                Embedding.image_id.in_(wanted), Embedding.model_name == self.embedder.source.name)).all())
            indexed = set(s.scalars(sa.select(Embedding.image_id).where(
                Embedding.image_id.in_(wanted), Embedding.model_name == self.embedder.name)).all())
        missing = [i for i in wanted if i not in found or i not in indexed]
        if missing:
            raise NotFound(f"image {missing[0]} not found (or has no {self.embedder.name} vector)")
        return wanted, [np.asarray(found[i], np.float32) for i in wanted]

    def search_vector(self, vector: np.ndarray, k: int = 10, use_prototypes: bool = True, top_categories: int = 3,
                      category: str | int | None = None, offset: int = 0, min_score: float | None = None,
                      where: list[Condition] | None = None) -> SearchResponse:
        """Search for one query vector (d,) as the index holds them (for a derived model: through its head)."""
        return self._search(vector[None, :], np.zeros((0, vector.shape[0]), np.float32), k, use_prototypes,
                            top_categories, category, offset, min_score, where, in_index_space=True)

    def _search(self, positives: np.ndarray, negatives: np.ndarray, k: int, use_prototypes: bool,
                top_categories: int, category: str | int | None, offset: int, min_score: float | None,
                where: list[Condition] | None, strategy: str = DEFAULT_STRATEGY, weight: float = NEGATIVE_WEIGHT,
                exclude: set[int] = frozenset(), in_index_space: bool = False,
                collapse: float | None = None) -> SearchResponse:
        """Ranks offset+1 .. offset+k (offset + k at most MAX_DEPTH) of the images scoring min_score or more whose
        metadata match `where`, leaving out `exclude`; every page of one query comes from the same ranking (for the
        exact index types). The examples are base model vectors unless in_index_space.

        A filter matching at most filters.PREFILTER_MAX_IDS images is a pre-filter: FAISS searches only those (exact,
        however few). One matching more is a post-filter: the search fetches more than the page, keeps the matching
        results, and fetches four times as many again until the page is full or nothing more can be found; past
        POST_FILTER_MAX_FETCH results (the matches lie far from the query) it searches among all the matching ids,
        as a pre-filter does. Stage 1 ranks only the categories that hold a match, either way."""
        if offset < 0 or k < 1 or offset + k > MAX_DEPTH:
            raise ValueError(f"offset + k must be at most {MAX_DEPTH} (offset {offset}, k {k})")
        filter_ids = [self._category_id(category)] if category is not None else None
        wanted = offset + k + 1  # one more than the page: is there a next page?
        among, post_filter = None, False
        if where:
            with self.sessions() as s:
                matching = filters.matching_ids(s, where, filters.PREFILTER_MAX_IDS)
                if matching is None and use_prototypes:
                    holding = filters.matching_categories(s, where)
                    filter_ids = [c for c in (filter_ids or holding) if c in holding]
            post_filter = matching is None
            among = np.array(matching, np.int64) if matching is not None else None
        fetch = (wanted + len(exclude)) * (COLLAPSE_FETCH if collapse is not None else 1)
        if post_filter:  # at least PREFILTER_MAX_IDS of the index match: expect that share, fetch a quarter more
            fetch = min(math.ceil(fetch * max(1.0, len(self.index) / filters.PREFILTER_MAX_IDS) * 1.25),
                        POST_FILTER_MAX_FETCH)
        floor = min_score if min_score is not None else -np.inf
        # A negative example's penalty can lift a lower candidate above a higher one: no early stop on scores then.
        monotone = strategy == "mean" or not len(negatives)
        search_ms, confidence, checked, matched = 0.0, None, set(), set()
        while True:
            with self._lock:
                t0 = time.perf_counter()
                hits, complete, query, base = self._rank(positives, negatives, fetch, MAX_DEPTH + 1 + len(exclude),
                                                         use_prototypes, top_categories, filter_ids, among, strategy,
                                                         weight, in_index_space)
                search_ms += (time.perf_counter() - t0) * 1000
                if confidence is None:
                    # Stage 1 already ranked every category for one plain query, unless a filter narrowed it.
                    plain = use_prototypes and filter_ids is None and among is None
                    ranking = hits.prototype_ranking if plain and len(positives) == 1 and not len(negatives) else None
                    confidence = self.confidence_of(query, base, ranking)
                size = len(self.index)
            keep = (hits.scores >= floor) & ~np.isin(hits.ids, list(exclude))
            if post_filter:
                fresh = [i for i in hits.ids[keep].tolist() if i not in checked]  # each candidate is asked about once
                with self.sessions() as s:
                    matched |= filters.which_match(s, where, fresh)
                checked.update(fresh)
                keep &= np.isin(hits.ids, list(matched))
            low = monotone and len(hits.scores) and hits.scores[-1] < floor  # the rest score lower still
            if not post_filter or keep.sum() >= wanted or complete or low or fetch >= size:
                break
            if fetch >= POST_FILTER_MAX_FETCH:
                with self.sessions() as s:
                    among = filters.all_matching_ids(s, where)
                post_filter, fetch = False, wanted + len(exclude)
                continue
            fetch = min(fetch * 4, size, POST_FILTER_MAX_FETCH)
        t1 = time.perf_counter()
        ranked = np.flatnonzero(keep)
        if collapse is not None:
            ranked = self._collapsed(hits.ids, ranked, collapse)
        page = ranked[offset:offset + k]
        hits.ids, hits.scores, hits.categories = hits.ids[page], hits.scores[page], hits.categories[page]
        results, prototypes = self._describe(hits, first_rank=offset + 1)
        return SearchResponse(results, prototypes, {"search": round(search_ms, 2),
                                                    "lookup": round((time.perf_counter() - t1) * 1000, 2)},
                              use_prototypes, confidence.as_dict() if confidence is not None else None,
                              offset=offset,
                              next_offset=offset + k if len(ranked) > offset + k and offset + k < MAX_DEPTH else None)

    def _collapsed(self, ids: np.ndarray, ranked: np.ndarray, threshold: float) -> np.ndarray:
        """The ranked positions whose images are not near-duplicates of one ranked before (backend.search.duplicates)."""
        order = ids[ranked].tolist()
        with self.sessions() as s:
            stored = dict(s.execute(sa.select(Embedding.image_id, Embedding.vector).where(
                Embedding.image_id.in_(order), Embedding.model_name == self.embedder.name)).all()) if order else {}
        present = [i for i in order if i in stored]
        vectors = np.array([np.asarray(stored[i], np.float32) for i in present]).reshape(len(present), -1)
        kept = set(duplicates.collapse(present, vectors, threshold))
        return np.array([r for r, i in zip(ranked.tolist(), order) if i in kept], np.int64)

    def duplicate_groups(self, threshold: float = duplicates.DEFAULT_THRESHOLD) -> list[list[SearchResult]]:
        """Groups of near-duplicate images (at least `threshold` alike), largest first, leaving out pairs a person
        already decided about; each member described as a search result scoring its highest similarity to another
        member."""
        with self._lock:  # the index holds still (and FAISS searches one at a time) while every image is looked at
            pairs = duplicates.similar_pairs(self.index, threshold)
            category_of = self.index.assignments()
        with self.sessions() as s:
            found = duplicates.groups(pairs, decisions.decided_pairs(s, {i for pair in pairs for i in pair}))
        best: dict[int, float] = {}  # each image's highest similarity to another of its group
        for (a, b), score in pairs.items():
            best[a], best[b] = max(best.get(a, score), score), max(best.get(b, score), score)
        described = []
        for group in found:
            scores = np.array([best[i] for i in group], np.float32)
            hits = Hits(np.array(group, np.int64), scores, np.array([category_of.get(i, -1) for i in group], np.int64))
            results, _ = self._describe(hits)
            if len(results) > 1:
                described.append(results)
        return described

    def decide_duplicates(self, image_ids: list[int], decision: str, keep: int | None = None) -> int:
        """A person's decision about a group: keep_one (the others are deleted), keep_all or not_duplicates (the
        group's pairs are not offered again). Returns how many images were deleted or pairs recorded."""
        with self.sessions() as s:
            stored = set(s.scalars(sa.select(Image.id).where(Image.id.in_(set(image_ids)))))
        if missing := sorted(set(image_ids) - stored):
            raise NotFound(f"image {missing[0]} not found")
        if decision == "keep_one":
            if keep not in image_ids:
                raise InvalidQuery("keep_one needs `keep`: the id, among the group's, of the image to keep")
            doomed = sorted(set(image_ids) - {keep})
            with self.sessions() as s, s.begin():
                deleted = image_store.delete_images(s, doomed)
            self._wrote()
            with self._sync_lock:
                self.manager.sync(doomed)
            return deleted
        with self.sessions() as s, s.begin():
            return decisions.record(s, image_ids, decision)

    def _rank(self, positives: np.ndarray, negatives: np.ndarray, fetch: int, pool: int, use_prototypes: bool,
              top_categories: int, categories, among, strategy: str, weight: float, in_index_space: bool):
        """(the `fetch` best hits by the strategy, whether they are all there are, the query vector for confidence,
        its base vector). The `max` strategy with negatives re-ranks at least `pool` candidates per positive, the same
        for every page. Call with the lock held: the head that makes index-space vectors is swapped under it."""
        if in_index_space:
            pos, neg, base = positives, negatives, None
        else:
            pos, neg = self._to_index_space(positives), self._to_index_space(negatives)
            base = positives[0] if len(positives) == 1 else unit(positives.mean(axis=0))
        search = partial(self.index.search, top_categories=top_categories, use_prototypes=use_prototypes,
                         categories=categories, among=among)
        if strategy == "mean":
            query = mean_query(pos, neg, weight)
            hits = search(query[None, :], fetch)[0]
            return hits, len(hits.ids) < fetch, query, base
        depth = max(fetch, pool) if len(neg) else fetch
        per_positive = search(pos, depth)
        hits = best_of(per_positive)
        if len(neg):
            hits = penalise(hits, self.index.search(neg, max(1, len(hits.ids)), use_prototypes=False,
                                                    among=hits.ids), weight)
        query = pos[0] if len(pos) == 1 else unit(pos.mean(axis=0))
        return hits, all(len(h.ids) < depth for h in per_positive), query, base

    def _wrote(self) -> None:
        """Note a write made or applied here (a cached summary of metadata keys is then stale)."""
        self._writes = next(self._write_count)  # itertools.count: atomic, no lock to wait for

    def metadata_keys(self) -> list[dict]:
        """The filterable metadata keys stored, with their values or ranges (backend.storage.filters.summarise_keys); read
        again after a write this process made or applied (but not within KEYS_MIN_AGE seconds of the last read), and
        KEYS_MAX_AGE seconds after it."""
        def fresh(cached) -> bool:
            age = time.monotonic() - cached[1]
            return age < KEYS_MIN_AGE or (cached[0] == self._writes and age < KEYS_MAX_AGE)

        if self._keys is not None and fresh(self._keys):
            return self._keys[2]
        with self._keys_lock:  # one summary at a time: the others wait for it rather than read every image too
            if self._keys is None or not fresh(self._keys):
                writes = self._writes
                with self.sessions() as s:
                    self._keys = (writes, time.monotonic(), filters.summarise_keys(s))
            return self._keys[2]

    def rank_prototypes(self, image: ImageInput, top_categories: int = 3) -> SearchResponse:
        """Stage 1 alone: the categories closest to the query image."""
        t0 = time.perf_counter()
        base = self._embed_base(image)
        t1 = time.perf_counter()
        with self._lock:
            vector = self._to_index_space(base)
            cats, sims = self.index.rank_prototypes(vector[None, :])
            confidence = self.confidence_of(vector, base, list(zip(cats[0].tolist(), sims[0].tolist())))
        names = self._category_names(cats[0].tolist())
        protos = [{"category_id": c, "category": names.get(c), "similarity": float(s)}
                  for c, s in zip(cats[0][:top_categories].tolist(), sims[0][:top_categories].tolist())]
        return SearchResponse([], protos, {"embedding": round((t1 - t0) * 1000, 2),
                                           "prototypes": round((time.perf_counter() - t1) * 1000, 2)},
                              confidence=confidence.as_dict() if confidence is not None else None)

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
        report = self._ingest([item])
        if report.failed:  # ingestion stores nothing for bytes that do not decode
            raise InvalidImage(report.failed[0][1])
        with self.sessions() as s:
            image_id = s.scalar(sa.select(Image.id).where(Image.sha256 == sha256(data)))
        return AddResult(image_id=image_id, duplicate=not report.image_ids)

    def delete_image(self, image_id: int) -> None:
        """Delete an image, its vectors and its share of its category's prototype."""
        with self.sessions() as s, s.begin():
            if not image_store.delete_images(s, [image_id]):
                raise NotFound(f"image {image_id} not found")
        self._wrote()
        with self._sync_lock:
            self.manager.sync([image_id])

    def build_database(self, dataset: str = "folder", data_dir: Path | None = None, split: str = "train",
                       num_images: int | None = None, image_dir: Path | None = None,
                       progress: bool = True) -> IngestReport:
        """Load a dataset (cifar10, fashion-mnist, folder or a CSV), embed and index it."""
        items = select_balanced(load_dataset(dataset, split, data_dir, image_dir), num_images)
        return self._ingest(items, progress=progress)

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
        self._wrote()
        with self._sync_lock:
            changed = self.manager.sync()
        self._recalibrate()  # images may have moved between categories (a recluster)
        return changed

    def rebuild(self) -> None:
        """Recompute prototypes and rebuild the index from PostgreSQL, then snapshot it; searches go on meanwhile."""
        with self._sync_lock:
            self.manager.rebuild(save=True)

    def rebuild_prototypes(self) -> None:
        """Recompute every prototype exactly in PostgreSQL and load them into the index."""
        with self.sessions() as s, s.begin():
            prototype_store.rebuild_prototypes(s, self.embedder.name)
        with self._sync_lock:
            self.manager.sync([])

    def check(self) -> Report:
        """Compare the live index with PostgreSQL, and PostgreSQL's vectors and prototypes with each other; a write
        in flight (stored, not yet indexed) shows as a difference, so check a quiet service or check again."""
        with self._sync_lock:  # the index holds still; searches go on
            return check(self.sessions, self.embedder.name, self.index, "live")

    def save_snapshot(self) -> None:
        """Write the index snapshot now (it is otherwise written on rebuild)."""
        with self._sync_lock:
            self.manager.save_snapshot()

    @staticmethod
    def warm_up_query() -> bytes:
        """A PNG to search with before serving, so that the first person to search does not pay for setting up the
        query path (kernels, the model thread, decoder plugins, the web stack)."""
        gradient = PILImage.linear_gradient("L").resize((320, 240)).convert("RGB")
        buffer = io.BytesIO()
        gradient.save(buffer, format="PNG")
        return buffer.getvalue()

    def close(self) -> None:
        """Stop listening and batching queries, and snapshot the index if writes changed it since the last
        snapshot (and the collection was not deleted), so the next start loads it."""
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        with self._sync_lock:
            if not self.dropped and not self.manager.snapshot_is_current():  # uploads, deletes or a refresh changed it
                self.manager.save_snapshot()
            self.manager.close()

    def _ingest(self, items: list[Item], progress: bool = False) -> IngestReport:
        report = ingest(self.sessions, items, self.embedder, batch_size=self.batch_size, progress=progress)
        self._wrote()
        with self._sync_lock:
            self.manager.sync(report.image_ids)
        return report

    # -- lookups ----------------------------------------------------------------------------------
    def _category_id(self, category: str | int) -> int:
        with self.sessions() as s:
            column = Category.id if isinstance(category, int) else Category.name
            found = s.scalar(sa.select(Category.id).where(column == category))
        if found is None:
            raise NotFound(f"category {category!r} not found")
        return found

    def _category_names(self, ids: list[int]) -> dict[int, str]:
        if not ids:
            return {}
        with self.sessions() as s:
            return dict(s.execute(sa.select(Category.id, Category.name).where(Category.id.in_(ids))).all())

    def _describe(self, hits, first_rank: int = 1) -> tuple[list[SearchResult], list[dict]]:
        ids = hits.ids.tolist()
        with self.sessions() as s:
            rows = {r.id: r for r in s.execute(
                sa.select(Image.id, Image.original_name, Image.label, Image.category_id, Image.metadata_, Category.name)
                .join(Category, isouter=True).where(Image.id.in_(ids))).all()} if ids else {}
        names = self._category_names([c for c, _ in hits.prototype_ranking])
        # An image deleted by another process since the last refresh is left out.
        results = [SearchResult(image_id=i, score=float(score), rank=rank, category=rows[i].name,
                                category_id=int(cat), file_name=rows[i].original_name, label=rows[i].label,
                                metadata=rows[i].metadata_)
                   for rank, (i, score, cat) in enumerate(zip(ids, hits.scores.tolist(), hits.categories.tolist()),
                                                          first_rank)
                   if i in rows]
        chosen = set(hits.searched_categories)
        prototypes = [{"category_id": c, "category": names.get(c), "similarity": float(sim)}
                      for c, sim in hits.prototype_ranking if c in chosen]
        return results, prototypes
