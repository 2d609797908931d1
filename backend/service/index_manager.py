"""The search index's life cycle: built from PostgreSQL, snapshotted to disk, kept in step with the database.

A snapshot is one file (backend.search.snapshot: every category's FAISS index, the prototypes, and a footer saying what
it was built from: model, index type, dim, the database's fingerprint, vectors per category, with a CRC-32 of each
part). It is written to a temporary file, fsynced and renamed into place, so a reader finds the old file or the new
one, whole. At start-up a snapshot is used only if it reads back, its checksums and contents agree with its footer,
and it matches PostgreSQL; a file that fails is moved aside (never deleted) and the index is rebuilt from
PostgreSQL, reading the vectors in bulk (backend.storage.members).

Several processes may serve one database (uvicorn workers, servers behind a load balancer) and share a snapshot
folder: only one of them writes each snapshot, the first to take the lock file beside it, for as long as it runs.
"""
import ctypes
import functools
import errno
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.embedding import projection
from backend.search import snapshot
from backend.pipeline.consistency import Report, check
from backend.search.category_index import CategoryIndex
from backend.search.snapshot import SnapshotError, read_meta, read_snapshot, snapshot_path
from backend.storage import heads as head_store
from backend.storage import prototypes as prototype_store
from backend.storage.fingerprints import (category_counts, consistent_reads, count_differences, fingerprint,
                                          index_fingerprint)
from backend.storage.members import copy_members, fetch_members
from backend.storage.tables import Embedding, Image

log = logging.getLogger(__name__)
# When more than this share of the index changed category, it is rebuilt beside the old one (searches go on)
# rather than changed in place under the search lock.
REBUILD_SHARE = 0.1


def _return_freed_memory() -> None:
    """Hand the memory freed while building back to the OS: glibc keeps it for reuse otherwise, and the process
    would go on counting the flat copies that IVF categories replaced. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriterLock:
    """An exclusive flock on `path`, tried without waiting and kept until released, so that of several processes one
    does a job. Within a process every holder shares it (the lock is per process, counted); where there are no
    flocks (Windows) every process takes it."""

    _held: dict[Path, list] = {}  # path -> [open file holding the flock, holders in this process]
    _guard = threading.Lock()

    def __init__(self, path: Path):
        self.path, self._holding = Path(path).resolve(), False

    def acquire(self) -> bool:
        """True if this process holds the lock (now or already); False while another process holds it."""
        if self._holding:
            return True
        with self._guard:
            if self.path in self._held:
                self._held[self.path][1] += 1
            else:
                if (file := self._take()) is None:
                    return False
                self._held[self.path] = [file, 1]
        self._holding = True
        return True

    def _take(self):
        try:
            import fcntl
        except ImportError:
            return open(os.devnull)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            file.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        file.truncate(0)
        file.write(f"{os.getpid()}\n")  # for a person wondering who writes
        file.flush()
        return file

    def holder(self) -> str:
        """The pid written by whoever holds (or last held) the lock, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        """Let go; the flock is dropped when this process's last holder lets go."""
        if not self._holding:
            return
        self._holding = False
        with self._guard:
            entry = self._held[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()  # closing drops the flock
                del self._held[self.path]


def _one_at_a_time(method):
    """Run an IndexManager method under its sync_lock: one sync, rebuild, check or snapshot at a time."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.sync_lock:
            return method(self, *args, **kwargs)
    return locked


class IndexManager:
    """Owns one CategoryIndex for a model and index type; PostgreSQL stays the source of truth."""

    def __init__(self, sessions: sessionmaker, model_name: str, dim: int, index_type: str, snapshot_dir: Path):
        self.sessions, self.model_name, self.dim, self.index_type = sessions, model_name, dim, index_type
        # Held only while the index changes in memory (searches hold it too); reading the database happens outside
        # it, so searches go on meanwhile.
        self.lock = threading.RLock()
        # One sync, rebuild, check or snapshot at a time (taken before `lock`): the index's own methods take it.
        self.sync_lock = threading.RLock()
        self.changes = 0  # syncs and rebuilds so far: what was cached about the collection before the last is stale
        self.snapshot_path = snapshot_path(snapshot_dir, model_name, index_type)
        self.index = CategoryIndex(dim, index_type, self.snapshot_path.parent)
        self.fingerprint: str | None = None  # of the database the index matches; None after incremental changes
        self.saved_fingerprint: str | None = None  # of the database the snapshot on disk matches
        self.source = "rebuilt"  # how the index came to be; see ImageSearch.index_source
        self.writer = WriterLock(self.snapshot_path.with_suffix(".writer"))
        # A derived model's index holds one head version's vectors: queries go through this head (read under `lock`,
        # where index and head are swapped together).
        self.head: projection.Head | None = None
        self.prototype_versions: dict[int, str] = {}  # per category, the prototypes' row versions the index holds

    # -- start-up ---------------------------------------------------------------------------------
    def load_or_build(self) -> str:
        """Load the snapshot if it can be trusted and matches the database, else rebuild from PostgreSQL (moving an
        untrustworthy file aside first); the snapshot file never stops this. Returns self.source."""
        started = time.perf_counter()
        try:
            why = self._load_snapshot()
            if why is None:
                log.info("loaded %s index (%d vectors) from snapshot %s in %.2f s", self.model_name, len(self.index),
                         self.snapshot_path, time.perf_counter() - started)
                return self.source
            damage = None
        except SnapshotError as exc:
            why = damage = f"snapshot was {exc}, {self._move_aside()}"
            log.warning("%s: %s; rebuilding the index from PostgreSQL", self.snapshot_path, damage)
        self.rebuild(save=False)
        try:
            self.save_snapshot()
        except OSError as exc:  # the index serves from memory all the same; the next start rebuilds it again
            log.warning("could not write the snapshot %s: %s", self.snapshot_path, exc)
        if damage:
            self.source = f"rebuilt: {damage}"
        log.info("%s: rebuilt %s index (%d vectors) from PostgreSQL in %.2f s", why, self.model_name,
                 len(self.index), time.perf_counter() - started)
        return self.source

    def _load_snapshot(self) -> str | None:
        """Use the snapshot if it is sound and current: None when it was loaded, else why not ('no snapshot',
        'snapshot is stale'). Raises SnapshotError for a file that cannot be trusted."""
        if not self.snapshot_path.exists():
            return "no snapshot"
        with consistent_reads(self.sessions) as s:
            current, counts = fingerprint(s, self.model_name), category_counts(s, self.model_name)
            head = self._read_head(s)
            # The snapshot's prototypes may be older than the database's (a rebuild of prototypes alone, or another
            # PROTOTYPES_PER_CATEGORY): they are taken from PostgreSQL, with the same view as the fingerprint.
            prototypes = self._read_prototypes(s, {})
        if head is not None and (read_meta(self.snapshot_path) or {}).get("head") != head.version:
            return "snapshot is of another head version"  # a new version was trained since it was written
        index, meta = read_snapshot(self.snapshot_path, self.model_name, self.index_type,
                                    head.out_dim if head else self.dim)
        if meta.get("fingerprint") != current:
            return "snapshot is stale"  # the database moved on since it was written: expected, not damage
        # The metadata claims the database as it is now; the contents must bear that out.
        if difference := count_differences(index.category_sizes(), counts, "the snapshot"):
            raise SnapshotError(f"out of step with PostgreSQL ({difference})")
        if index_fingerprint(index) != current:
            raise SnapshotError("out of step with PostgreSQL (the same counts, but other images or categories)")
        index.drop_prototypes(index.categories)
        self._apply_prototypes(index, *prototypes)
        with self.lock:
            self.index, self.fingerprint, self.source = index, current, "snapshot"
            self._use_head(head)
        self.saved_fingerprint = current
        return None

    def _move_aside(self) -> str:
        """Rename the snapshot to <name>.bad-<time>.snapshot beside it, for a person to look at; says where it went."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in itertools.count():  # two bad files in one second keep both
            bad = self.snapshot_path.with_name(
                f"{self.snapshot_path.stem}.bad-{stamp}{f'-{n}' if n else ''}{snapshot.SUFFIX}")
            if not bad.exists():
                break
        try:
            os.replace(self.snapshot_path, bad)
        except OSError as exc:
            return f"could not be moved aside ({exc})"
        return f"moved to {bad}"

    @_one_at_a_time
    def rebuild(self, save: bool = True, prototypes: bool = True) -> None:
        """Recompute prototypes exactly in PostgreSQL (unless `prototypes` is False) and rebuild the index from it,
        streaming the vectors in. Both read every vector, so they run side by side on two connections: PostgreSQL
        averages while we parse."""
        self.changes += 1
        with ThreadPoolExecutor(1, thread_name_prefix="prototypes") as pool:
            recomputed = pool.submit(self._rebuild_prototypes if prototypes else lambda: None)
            with consistent_reads(self.sessions) as s:
                current, head = fingerprint(s, self.model_name), self._read_head(s)  # a head and its vectors agree
                dim = head.out_dim if head else self.dim
                index = CategoryIndex(dim, self.index_type, self.snapshot_path.parent)
                copy_members(s, self.model_name, dim,
                             lambda ids, cats, vectors: index.add(ids, vectors, cats, optimise=False))
            recomputed.result()
        # Read after the members: a writer in between changes the fingerprint, and the next sync() catches up.
        with consistent_reads(self.sessions) as s:
            if head is not None and head_store.current_version(s, self.model_name) != head.version:
                s.close()  # a new head version was published meanwhile: its vectors and prototypes, then
                return self.rebuild(save=save, prototypes=prototypes)
            prototypes = self._read_prototypes(s, {})
        index.optimise()
        _return_freed_memory()
        self._apply_prototypes(index, *prototypes)
        with self.lock:  # searches used the old index until now
            self.index, self.fingerprint, self.source = index, current, "rebuilt"
            self._use_head(head)
        if save:
            self.save_snapshot()

    def _read_head(self, session: Session) -> "projection.Head | None":
        """The head a derived model's vectors were made with (as the session sees the database); None for others."""
        return head_store.require_head(session, self.model_name) if projection.is_derived(self.model_name) else None

    def _use_head(self, head) -> None:
        """Called under the lock with the index that `head` made."""
        if head is not None and head is not self.head:
            self.head, self.dim = head, head.out_dim

    def _rebuild_prototypes(self) -> None:
        with self.sessions() as s, s.begin():
            prototype_store.rebuild_prototypes(s, self.model_name)

    # -- keeping in step ----------------------------------------------------------------------------
    @_one_at_a_time
    def sync(self, image_ids=None) -> tuple[int, int]:
        """Bring the index in line with PostgreSQL (all images, or just `image_ids`), prototypes included; returns
        (added, removed)."""
        self.changes += 1
        with consistent_reads(self.sessions) as s:
            if self.head is not None and head_store.current_version(s, self.model_name) != self.head.version:
                s.close()  # a new head version re-projected every vector
                return self._rebuild_beside(save=True)
            if image_ids is None:
                current = fingerprint(s, self.model_name)
                new, gone = [], []
                if current != self.fingerprint:
                    in_db = dict(s.execute(self._member_ids().add_columns(Image.category_id)).all())
                    in_index = self.index.assignments()
                    # An image whose category changed (a recluster) leaves its old category and joins the new one.
                    moved = {i for i, c in in_db.items() if in_index.get(i, c) != c}
                    if len(moved) > REBUILD_SHARE * len(in_index):  # a recluster
                        s.close()
                        return self._rebuild_beside(save=False)
                    new = sorted((in_db.keys() - in_index.keys()) | moved)
                    gone = sorted((in_index.keys() - in_db.keys()) | moved)
            else:
                wanted = [int(i) for i in image_ids]
                in_db = set(s.scalars(self._member_ids().where(Embedding.image_id.in_(wanted))).all())
                new = sorted(i for i in in_db if i not in self.index)
                gone = sorted(i for i in wanted if i not in in_db and i in self.index)
                current = None
            ids, cats, vectors = fetch_members(s, self.model_name, self.dim, new) if new else ([], [], None)
            prototypes = self._read_prototypes(s, self.prototype_versions)  # they may change on their own
        with self.lock:
            removed = self.index.remove(gone)
            if len(ids):
                self.index.add(ids, vectors, cats)
            self._apply_prototypes(self.index, *prototypes)
            self.fingerprint = current
        return len(ids), removed

    def _read_prototypes(self, session: Session, held: dict[int, str]) -> tuple:
        """(versions, category ids, vectors) of the prototypes that differ from `held` (category -> row versions):
        only the categories whose prototypes were written since are read."""
        versions = prototype_store.prototype_versions(session, self.model_name)
        changed = [c for c, v in versions.items() if held.get(c) != v]
        cats, vectors, _ = (prototype_store.load_prototypes(session, self.model_name, changed if held else None)
                            if changed else ([], None, []))
        return versions, cats, vectors

    def _apply_prototypes(self, index: CategoryIndex, versions: dict[int, str], cats: list[int], vectors) -> None:
        """Give `index` the prototypes _read_prototypes found, dropping those of categories that have none now."""
        index.drop_prototypes(set(index.categories) - versions.keys())
        if cats:
            index.set_prototypes(cats, vectors)
        self.prototype_versions = versions

    def _rebuild_beside(self, save: bool) -> tuple[int, int]:
        """sync() by building the index anew beside the old one (searches go on), the prototypes as they are in
        PostgreSQL; returns (added, removed) as sync() does."""
        before = len(self.index)
        self.rebuild(save=save, prototypes=False)
        return max(0, len(self.index) - before), max(0, before - len(self.index))

    # -- snapshot ---------------------------------------------------------------------------------
    @_one_at_a_time
    def save_snapshot(self) -> bool:
        """Write the index with its metadata and checksum in one file; temp file, fsync and rename, so a crash
        leaves the old snapshot or the new one, whole. Returns False, writing nothing, when another process
        serving the same snapshot folder is the one that writes it."""
        if not self.writer.acquire():
            log.info("%s is written by process %s, not this one", self.snapshot_path, self.writer.holder())
            return False
        if self.fingerprint is None:  # after incremental changes: check against the whole database first
            self.sync()
        meta = {"model": self.model_name, "fingerprint": self.fingerprint, "vectors": len(self.index),
                "head": self.head.version if self.head else None,
                "counts": {str(c): n for c, n in self.index.category_sizes().items()}}
        folder = self.snapshot_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f, self.lock:  # writing compacts deleted ids out of graph indexes: a change
                snapshot.write(f, self.index, meta)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot_path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_directory(folder)
        self.saved_fingerprint = self.fingerprint
        return True

    @_one_at_a_time
    def check(self) -> Report:
        """Compare the index with PostgreSQL, and PostgreSQL's vectors and prototypes with each other
        (backend.pipeline.consistency); the index holds still meanwhile, searches go on."""
        return check(self.sessions, self.model_name, self.index, "live")

    @_one_at_a_time
    def close(self, save: bool = True) -> None:
        """Snapshot the index if writes changed it since the last snapshot (unless `save` is False), and let another
        process write the snapshot from now on."""
        if save and not self.snapshot_is_current():
            self.save_snapshot()
        self.writer.release()

    def snapshot_is_current(self) -> bool:
        """Whether the snapshot on disk holds the index as it is now."""
        return self.fingerprint is not None and self.fingerprint == self.saved_fingerprint

    # -- queries ----------------------------------------------------------------------------------
    def _member_ids(self):
        return (sa.select(Embedding.image_id).join(Image, Image.id == Embedding.image_id)
                .where(Embedding.model_name == self.model_name, Image.category_id.is_not(None)))
