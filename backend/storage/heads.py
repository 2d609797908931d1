"""Projection heads as stored in PostgreSQL: versions, the current head of a derived model."""

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.embedding.projection import Head, base_of, decode_weights, is_derived
from backend.errors import ModelUnavailable
from backend.storage.tables import ProjectionHead

# (version, created at) -> head: a stored version never changes, so its weights are parsed once; the time tells apart
# the versions of two databases (or of one restored), which number theirs alike.
_PARSED: dict[tuple, Head] = {}
_PARSED_MAX = 8


def _parse(row: ProjectionHead) -> Head:
    head = _PARSED.get((row.version, row.created_at))
    if head is None:
        head = Head(row.version, row.model_name, row.base_model, row.kind, decode_weights(row.weights), row.report)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[(row.version, row.created_at)] = head
    return head


def forget_parsed() -> None:
    """Drop the parsed heads kept in memory: the next read parses the stored bytes again."""
    _PARSED.clear()


def current_version(session: Session, model_name: str) -> int | None:
    """The version of the head in use for a derived model, or None when it has none."""
    return session.scalar(sa.select(sa.func.max(ProjectionHead.version))
                          .where(ProjectionHead.model_name == model_name))


def current_head(session: Session, model_name: str) -> Head | None:
    """The head in use for a derived model (its newest version), or None."""
    row = session.scalars(sa.select(ProjectionHead).where(ProjectionHead.model_name == model_name)
                          .order_by(ProjectionHead.version.desc()).limit(1)).first()
    return _parse(row) if row is not None else None


def require_head(session: Session, model_name: str) -> Head:
    """current_head(), or ModelUnavailable saying how to train one."""
    head = current_head(session, model_name)
    if head is None:
        raise ModelUnavailable(f"{model_name} has no trained head yet: run `python -m backend train-projection` "
                               f"on a collection with {base_of(model_name)} vectors and categories")
    return head


def model_dim(session: Session, name: str) -> int:
    """The vector dimension of any model, base or derived, without loading it."""
    from backend.embedding import models

    return require_head(session, name).out_dim if is_derived(name) else models.model_dim(name)


def heads_deriving(session: Session, base_model: str) -> list[Head]:
    """The heads in use that derive a model from `base_model` (one per derived model)."""
    newest = (sa.select(sa.func.max(ProjectionHead.version)).where(ProjectionHead.base_model == base_model)
              .group_by(ProjectionHead.model_name))
    keys = [tuple(row) for row in session.execute(sa.select(ProjectionHead.version, ProjectionHead.created_at)
                                                  .where(ProjectionHead.version.in_(newest)))]
    heads = {key: _PARSED[key] for key in keys if key in _PARSED}  # every ingestion batch asks: weights read once
    if missing := [version for version, created in keys if (version, created) not in heads]:
        heads.update(((row.version, row.created_at), _parse(row)) for row in session.scalars(
            sa.select(ProjectionHead).where(ProjectionHead.version.in_(missing))))
    return [heads[key] for key in keys]


def lock_base(session: Session, base_model: str, exclusive: bool = False) -> None:
    """Writers of a base model's vectors hold this shared until they commit; a new head version holds it
    exclusively while it re-projects, so that no base vector is projected by a head that is being replaced."""
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.execute(sa.text(f"SELECT {function}(hashtext('imsrc-head:' || :m))"), {"m": base_model})
