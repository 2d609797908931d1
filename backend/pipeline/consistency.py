"""Consistency checks for operators: PostgreSQL against itself (images, vectors, prototypes) and an index against
PostgreSQL. Read only, numpy and SQL, every read from one snapshot of the database. ImageSearch.check() runs it on
the live index; `python -m backend check` on the snapshot file as it is on disk."""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.search.category_index import CategoryIndex
from backend.search.snapshot import SnapshotError, read_snapshot, snapshot_path
from backend.storage.fingerprints import consistent_reads, count_differences, fingerprint
from backend.storage.members import fetch_members
from backend.storage.tables import Category, Embedding, EmbeddingModel, Image, Prototype

VECTOR_TOLERANCE = 1e-6  # float32 copies of PostgreSQL's float32 vectors: equal but for rounding
# Stored prototypes come from float32 running sums that round at every add and delete; the check recomputes in
# float64. The sum's bound grows with the members summed (each component of a unit vector is at most 1).
PROTOTYPE_TOLERANCE = 1e-5
EXAMPLES = 5  # ids named per finding


@dataclass
class Report:
    """What a check compared and found: one line per problem; no findings means consistent."""

    model: str
    index: str | None  # what was compared with PostgreSQL ('live', 'snapshot'), or None: PostgreSQL on its own
    images: int = 0
    vectors: int = 0
    prototypes: int = 0
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # context for a person, not problems

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """One line: OK or how many problems, and what was checked."""
        checked = f"{self.images:,} images, {self.vectors:,} {self.model} vectors, {self.prototypes:,} prototypes"
        compared = f"index ({self.index})" if self.index else "no index compared"
        if self.ok:
            return f"check: OK: {checked}, {compared}{' matches' if self.index else ''}"
        return f"check: {len(self.findings)} problem{'s' * (len(self.findings) > 1)}: {checked}, {compared}"


def check(sessions: sessionmaker, model_name: str, index: CategoryIndex | None, index_name: str = "live") -> Report:
    """Check a model's images, vectors and prototypes in PostgreSQL against each other and, unless `index` is None,
    the index against them."""
    with consistent_reads(sessions) as s:
        dim = s.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == model_name)) or \
            (index.dim if index is not None else 0)  # a model with no vectors stored has no row
        report = Report(model_name, index_name if index is not None else None,
                        images=s.scalar(sa.select(sa.func.count()).select_from(Image)),
                        vectors=s.scalar(sa.select(sa.func.count()).select_from(Embedding)
                                         .where(Embedding.model_name == model_name)))
        report.findings += _vector_findings(s, model_name)
        ids, cats, vectors = fetch_members(s, model_name, dim)
        slot_of = dict(s.execute(sa.select(Embedding.image_id, Embedding.slot)
                                 .where(Embedding.model_name == model_name)).all())
        stored = _stored_prototypes(s, model_name)
    report.prototypes = len(stored)
    members = dict(zip(*(column.tolist() for column in np.unique(cats, return_counts=True))))  # category -> count
    slots = np.array([slot_of[i] for i in ids.tolist()], dtype=np.int64)
    report.findings += _prototype_findings(cats, slots, vectors, stored, model_name)
    if index is not None:
        report.findings += _index_findings(index, ids, cats, vectors, members, stored, model_name)
    return report


def check_snapshot(sessions: sessionmaker, model_name: str, dim: int, index_type: str, snapshot_dir: Path) -> Report:
    """check() against the model's snapshot file as it is on disk: read and verified, never repaired or moved
    (start-up does that). With no snapshot, or one merely older than the database (a server that stopped before
    writing it: the next start rebuilds it), PostgreSQL on its own and a note: only a damaged file or a snapshot
    that disagrees with the database it says it matches is a problem."""
    path = snapshot_path(snapshot_dir, model_name, index_type)
    if not path.exists():
        report = check(sessions, model_name, None)
        report.notes.append(f"no snapshot at {path} (the server writes one at start-up): PostgreSQL checked on its own")
        return report
    try:
        index, meta = read_snapshot(path, model_name, index_type, dim)
    except SnapshotError as exc:
        report = check(sessions, model_name, None)
        report.findings.insert(0, f"the snapshot {path} is {exc}")
        return report
    with consistent_reads(sessions) as s:
        current = fingerprint(s, model_name)
    if meta.get("fingerprint") != current:
        report = check(sessions, model_name, None)
        report.notes.append(f"the snapshot {path} is older than the database (written before its last changes): "
                            "the next start rebuilds it; PostgreSQL checked on its own")
        return report
    report = check(sessions, model_name, index, "snapshot")
    report.notes.append(f"snapshot {path}")
    return report


def _count(ids) -> str:
    """'3 (ids 4, 9, 12)': how many, and the first few."""
    ids = [int(i) for i in ids]
    return f"{len(ids):,} (ids {', '.join(map(str, ids[:EXAMPLES]))}{', ...' if len(ids) > EXAMPLES else ''})"


def _vector_findings(s: Session, model: str) -> list[str]:
    """Images in a category without a vector of the model, and vectors whose image or category is gone."""
    findings = []
    has_vector = sa.exists().where(Embedding.image_id == Image.id, Embedding.model_name == model)
    missing = s.scalars(sa.select(Image.id).where(Image.category_id.is_not(None), ~has_vector).order_by(Image.id)).all()
    if missing:
        findings.append(f"images in a category without a {model} vector, so never found: {_count(missing)}")
    # The foreign keys forbid both; this catches a database restored or edited around them.
    orphans = s.execute(
        sa.select(Embedding.image_id, Image.id.is_(None)).select_from(Embedding)
        .outerjoin(Image, Image.id == Embedding.image_id).outerjoin(Category, Category.id == Image.category_id)
        .where(Embedding.model_name == model,
               sa.or_(Image.id.is_(None), sa.and_(Image.category_id.is_not(None), Category.id.is_(None))))
        .order_by(Embedding.image_id)).all()
    no_image = [i for i, gone in orphans if gone]
    no_category = [i for i, gone in orphans if not gone]
    if no_image:
        findings.append(f"{model} vectors of no stored image: {_count(no_image)}")
    if no_category:
        findings.append(f"images with {model} vectors in a category that does not exist: {_count(no_category)}")
    return findings


def _stored_prototypes(s: Session, model: str) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]]:
    """(category, slot) -> (vector, vector_sum, member_count) as PostgreSQL stores them, vectors in float64, by
    category and slot."""
    rows = s.execute(sa.select(Prototype.category_id, Prototype.slot, Prototype.vector, Prototype.vector_sum,
                               Prototype.member_count).where(Prototype.model_name == model)
                     .order_by(Prototype.category_id, Prototype.slot)).all()
    return {(c, slot): (np.asarray(v, np.float64), np.asarray(total, np.float64), n) for c, slot, v, total, n in rows}


def _name(key: tuple[int, int]) -> str:
    c, slot = key
    return f"prototype of category {c}" + (f" (slot {slot})" if slot else "")


def _prototype_findings(cats: np.ndarray, slots: np.ndarray, vectors: np.ndarray, stored: dict,
                        model: str) -> list[str]:
    """Each stored prototype against its members (the vectors of its category counting towards its slot)
    recomputed exactly: float64 sum, normalised mean, count."""
    findings = []
    keys, counts = np.unique(np.stack([cats, slots], axis=1), axis=0, return_counts=True) if len(cats) else ([], [])
    members = {(int(c), int(slot)): int(n) for (c, slot), n in zip(keys, counts)}
    for key, n in members.items():
        if key not in stored:
            findings.append(f"category {key[0]} has {n} {model} vectors but no prototype" +
                            (f" for slot {key[1]}" if key[1] else ""))
            continue
        vector, vector_sum, member_count = stored[key]
        exact_sum = vectors[(cats == key[0]) & (slots == key[1])].sum(axis=0, dtype=np.float64)
        if member_count != n:
            findings.append(f"{_name(key)}: member_count is {member_count}, but it has {n} members")
        # `not error <= tolerance` so that NaN counts as a difference
        if not (error := np.abs(vector_sum - exact_sum).max()) <= PROTOTYPE_TOLERANCE * n:
            findings.append(f"{_name(key)}: vector_sum is off its members' sum by up to {error:.3g}")
        if not (error := np.abs(vector - exact_sum / np.linalg.norm(exact_sum)).max()) <= PROTOTYPE_TOLERANCE:
            findings.append(f"{_name(key)}: vector is off its members' normalised mean by up to {error:.3g}")
    for key in sorted(set(stored) - set(members)):
        findings.append(f"{_name(key)} has no members (member_count {stored[key][2]})")
    return findings


def _index_findings(index: CategoryIndex, ids: np.ndarray, cats: np.ndarray, vectors: np.ndarray,
                    members: dict[int, int], stored: dict, model: str) -> list[str]:
    """The index against PostgreSQL's members (ids sorted): ids, categories, vectors, counts and prototypes."""
    if len(ids) and index.dim != vectors.shape[1]:
        return [f"the index holds {index.dim}-d vectors, PostgreSQL {vectors.shape[1]}-d {model} vectors"]
    findings = []
    in_index = np.zeros(len(ids), dtype=bool)
    indexed, extra, moved, differ = [], [], [], []
    for c, part_ids, part_vectors in index.partitions():
        indexed.append(part_ids)
        pos = np.searchsorted(ids, part_ids)
        found = pos < len(ids)
        found[found] = ids[pos[found]] == part_ids[found]
        extra += part_ids[~found].tolist()
        pos, hits = pos[found], part_ids[found]
        in_index[pos] = True
        moved += [(i, c, db_c) for i, db_c in zip(hits.tolist(), cats[pos].tolist()) if db_c != c]
        error = np.abs(part_vectors[found] - vectors[pos]).max(axis=1, initial=0)
        differ += hits[~(error <= max(VECTOR_TOLERANCE, index.kind.tolerance))].tolist()  # float16 codes round
    unique, times = np.unique(np.concatenate(indexed) if indexed else ids[:0], return_counts=True)
    if (repeated := unique[times > 1]).size:
        findings.append(f"images in the index more than once: {_count(repeated)}")
    if (missing := ids[~in_index]).size:
        findings.append(f"images with {model} vectors in PostgreSQL missing from the index: {_count(missing)}")
    if extra:
        findings.append(f"images in the index without a {model} vector and a category in PostgreSQL: "
                        f"{_count(sorted(extra))}")
    if moved:
        examples = "; ".join(f"image {i}: category {c} in the index, {db_c} in PostgreSQL"
                             for i, c, db_c in moved[:EXAMPLES]) + ("; ..." if len(moved) > EXAMPLES else "")
        findings.append(f"images in another category in the index than in PostgreSQL: {len(moved):,} ({examples})")
    if differ:
        findings.append(f"images whose vector in the index differs from PostgreSQL's: {_count(sorted(differ))}")
    if counts := count_differences(index.category_sizes(), members, "the index"):
        findings.append(f"vectors per category differ: {counts}")
    proto_cats, protos = index.prototypes()  # a category's prototypes in slot order, as PostgreSQL's below
    in_index_protos: dict[int, list[np.ndarray]] = {}
    for c, vector in zip(proto_cats.tolist(), protos):
        in_index_protos.setdefault(c, []).append(vector)
    in_db: dict[int, list[np.ndarray]] = {}
    for (c, _), (vector, _, _) in stored.items():
        in_db.setdefault(c, []).append(vector)
    for c in sorted(set(in_db) | set(in_index_protos)):
        if c not in in_index_protos:
            findings.append(f"the prototype of category {c} is in PostgreSQL but not in the index")
        elif c not in in_db:
            findings.append(f"the index has a prototype of category {c}, PostgreSQL has none")
        elif len(in_db[c]) != len(in_index_protos[c]):
            findings.append(f"category {c} has {len(in_index_protos[c])} prototypes in the index, "
                            f"{len(in_db[c])} in PostgreSQL")
        elif not (error := np.abs(np.stack(in_index_protos[c]) - np.stack(in_db[c])).max()) <= VECTOR_TOLERANCE:
            findings.append(f"the index's prototype of category {c} differs from PostgreSQL's by up to {error:.3g}")
    return findings
