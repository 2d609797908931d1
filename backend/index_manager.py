"""The search index's life cycle: built from PostgreSQL, snapshotted to disk, kept in step with the database."""
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend import store
from backend.models import Embedding, Image
from backend.search import CategoryIndex, index_from_state, index_state

log = logging.getLogger(__name__)


def fingerprint(session: Session, model_name: str) -> str:
    """A digest of which images (and in which categories) have vectors for the model."""
    row = session.execute(sa.text(
        "SELECT count(*), md5(coalesce(string_agg(e.image_id::text || ':' || i.category_id::text, ','"
        " ORDER BY e.image_id), '')) FROM embeddings e JOIN images i ON i.id = e.image_id"
        " WHERE e.model_name = :m AND i.category_id IS NOT NULL"), {"m": model_name}).one()
    return f"{row[0]}:{row[1]}"


def snapshot_path(snapshot_dir: Path, model_name: str, index_type: str) -> Path:
    """Where the index snapshot of a model and index type lives."""
    return Path(snapshot_dir) / f"{model_name}-{index_type}.npz"


def snapshot_meta(path: Path) -> dict | None:
    """What a snapshot says it was built from (model, index type, dim, fingerprint), or None if there is none."""
    try:
        return json.loads(path.with_suffix(".json").read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


class IndexManager:
    """Owns one CategoryIndex for a model and index type; PostgreSQL stays the source of truth."""

    def __init__(self, sessions: sessionmaker, model_name: str, dim: int, index_type: str, snapshot_dir: Path):
        self.sessions, self.model_name, self.dim, self.index_type = sessions, model_name, dim, index_type
        self.snapshot_path = snapshot_path(snapshot_dir, model_name, index_type)
        self.index = CategoryIndex(dim, index_type)
        self.fingerprint: str | None = None

    # -- start-up ---------------------------------------------------------------------------------
    def load_or_build(self) -> str:
        """Load the snapshot if it matches the database, else rebuild; returns 'snapshot' or 'rebuilt'."""
        started = time.perf_counter()
        with self.sessions() as s:
            current = fingerprint(s, self.model_name)
        meta = snapshot_meta(self.snapshot_path)
        if meta == {"model": self.model_name, "index_type": self.index_type, "dim": self.dim, "fingerprint": current}:
            with np.load(self.snapshot_path, allow_pickle=False) as state:
                self.index = index_from_state(state)
            self.fingerprint = current
            log.info("loaded %s index (%d vectors) from snapshot %s in %.2f s", self.model_name, len(self.index),
                     self.snapshot_path, time.perf_counter() - started)
            return "snapshot"
        reason = "no snapshot" if meta is None else "snapshot is stale"
        self.rebuild(save=True)
        log.info("%s: rebuilt %s index (%d vectors) from PostgreSQL in %.2f s", reason, self.model_name,
                 len(self.index), time.perf_counter() - started)
        return "rebuilt"

    def rebuild(self, save: bool = True) -> None:
        """Recompute prototypes exactly in PostgreSQL and rebuild the index from it."""
        with self.sessions() as s, s.begin():
            store.rebuild_prototypes(s, self.model_name)
        with self.sessions() as s:
            current = fingerprint(s, self.model_name)
            ids, cats, vectors = self._fetch_members(s, None)
            proto_cats, protos, _ = store.load_prototypes(s, self.model_name)
        index = CategoryIndex(self.dim, self.index_type)
        index.add(ids, vectors, cats)
        if proto_cats:
            index.set_prototypes(proto_cats, protos)
        self.index, self.fingerprint = index, current
        if save:
            self.save_snapshot()

    # -- keeping in step ----------------------------------------------------------------------------
    def sync(self, image_ids=None) -> tuple[int, int]:
        """Bring the index in line with PostgreSQL (all images, or just `image_ids`); returns (added, removed)."""
        with self.sessions() as s:
            if image_ids is None:
                current = fingerprint(s, self.model_name)
                if current == self.fingerprint:
                    return 0, 0
                in_db = set(s.scalars(self._member_ids()).all())
                in_index = set(self.index.ids().tolist())
                new, gone = sorted(in_db - in_index), sorted(in_index - in_db)
            else:
                wanted = [int(i) for i in image_ids]
                in_db = set(s.scalars(self._member_ids().where(Embedding.image_id.in_(wanted))).all())
                new = sorted(i for i in in_db if i not in self.index)
                gone = sorted(i for i in wanted if i not in in_db and i in self.index)
                current = None
            ids, cats, vectors = self._fetch_members(s, new) if new else ([], [], None)
            proto_cats, protos, _ = store.load_prototypes(s, self.model_name)
        removed = self.index.remove(gone)
        if len(ids):
            self.index.add(ids, vectors, cats)
        self.index.drop_prototypes(set(self.index.categories) - set(proto_cats))
        if proto_cats:
            self.index.set_prototypes(proto_cats, protos)
        self.fingerprint = current
        return len(ids), removed

    # -- snapshot ---------------------------------------------------------------------------------
    def save_snapshot(self) -> None:
        """Write the index and what it was built from; atomic, so a reader never sees half a file."""
        if self.fingerprint is None:  # after incremental changes: check against the whole database first
            self.sync()
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **index_state(self.index))
        meta = {"model": self.model_name, "index_type": self.index_type, "dim": self.dim, "fingerprint": self.fingerprint}
        self.snapshot_path.with_suffix(".json").write_text(json.dumps(meta))
        os.replace(tmp, self.snapshot_path)

    # -- queries ----------------------------------------------------------------------------------
    def _member_ids(self):
        return (sa.select(Embedding.image_id).join(Image, Image.id == Embedding.image_id)
                .where(Embedding.model_name == self.model_name, Image.category_id.is_not(None)))

    def _fetch_members(self, session: Session, image_ids):
        query = (sa.select(Embedding.image_id, Image.category_id, Embedding.vector)
                 .join(Image, Image.id == Embedding.image_id)
                 .where(Embedding.model_name == self.model_name, Image.category_id.is_not(None))
                 .order_by(Embedding.image_id))
        if image_ids is not None:
            query = query.where(Embedding.image_id.in_(list(image_ids)))
        rows = session.execute(query).all()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        cats = np.array([r[1] for r in rows], dtype=np.int64)
        vectors = np.stack([np.asarray(r[2], dtype=np.float32) for r in rows]) if rows else np.zeros((0, self.dim), np.float32)
        return ids, cats, vectors
