"""People's decisions about near-duplicate groups, kept so a decided pair never comes back."""
import itertools

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from backend.errors import InvalidQuery
from backend.storage.tables import DuplicateDecision

MAX_GROUP = 50  # images one decision may cover
DECISIONS = {"not_duplicates": "distinct", "keep_all": "kept_all"}  # what a person says -> what is stored


def decided_pairs(session, image_ids: set[int]) -> set[tuple[int, int]]:
    """The pairs among these images a person already decided about."""
    if not image_ids:
        return set()
    rows = session.execute(sa.select(DuplicateDecision.image_a, DuplicateDecision.image_b)
                           .where(DuplicateDecision.image_a.in_(image_ids)))
    return {(a, b) for a, b in rows if b in image_ids}


def record(session, image_ids: list[int], decision: str) -> int:
    """Store a person's decision about every pair of these images; returns how many pairs."""
    if decision not in DECISIONS:
        raise InvalidQuery(f"decision is one of {', '.join(DECISIONS)} or keep_one, not {decision!r:.40}")
    unique = sorted(set(image_ids))
    if not 2 <= len(unique) <= MAX_GROUP:
        raise InvalidQuery(f"a decision covers 2 to {MAX_GROUP} images, not {len(unique)}")
    rows = [{"image_a": a, "image_b": b, "decision": DECISIONS[decision]} for a, b in itertools.combinations(unique, 2)]
    stmt = insert(DuplicateDecision).values(rows)
    session.execute(stmt.on_conflict_do_update(index_elements=["image_a", "image_b"],
                                               set_={"decision": stmt.excluded.decision, "decided_at": sa.func.now()}))
    return len(rows)
