"""Search history and analytics: every search the API answers, kept in PostgreSQL for HISTORY_RETENTION_DAYS (off
with HISTORY_ENABLED=false), with enough to run it again (the query's vector and parameters, and a thumbnail of an
uploaded query), and summaries of it: searches per day, latency percentiles, the categories most searched and the
images most returned."""
import io
import itertools

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage

from backend.storage.tables import SearchRecord

THUMBNAIL_SIDE = 96  # pixels: enough to recognise a query in a list
PRUNE_EVERY = 500  # recordings between deletions of what is past retention
TOP = 10  # categories and images the analytics list
_recorded = itertools.count(1)


def thumbnail(image: PILImage.Image) -> bytes:
    """A small JPEG of the query image, for the history list."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def row(*, kind: str, model: str, params: dict, vector: np.ndarray | None, query_sha256: str | None,
        query_thumbnail: bytes | None, results: list, timings_ms: dict) -> dict:
    """One search as a row of search_history (results: SearchResults, best first)."""
    return {"kind": kind, "model_name": model, "params": params, "query_sha256": query_sha256,
            "query_vector": vector.astype(np.float32).tobytes() if vector is not None else None,
            "query_thumbnail": query_thumbnail, "result_ids": [r.image_id for r in results],
            "result_scores": [round(float(r.score), 5) for r in results],
            "top_category": results[0].category if results else None, "timings_ms": timings_ms,
            "total_ms": round(sum(timings_ms.values()), 2)}


def record(session, rows: list[dict], retention_days: int) -> None:
    """Store searches (rows as row() makes them) in one statement; every PRUNE_EVERY of them, delete what is older
    than the retention."""
    if not rows:
        return
    session.execute(sa.insert(SearchRecord), rows)
    # Counts every row (sum, not any: any would stop counting at the first multiple of PRUNE_EVERY).
    if sum(next(_recorded) % PRUNE_EVERY == 0 for _ in rows):
        prune(session, retention_days)


def prune(session, retention_days: int) -> int:
    """Delete the records older than the retention; returns how many."""
    cutoff = sa.func.now() - sa.func.make_interval(0, 0, 0, retention_days)
    return session.execute(sa.delete(SearchRecord).where(SearchRecord.at < cutoff)).rowcount


def page(session, offset: int, limit: int) -> tuple[int, list[SearchRecord]]:
    """(how many records, the newest first from `offset`)."""
    total = session.scalar(sa.select(sa.func.count()).select_from(SearchRecord))
    rows = session.scalars(sa.select(SearchRecord).order_by(SearchRecord.id.desc()).offset(offset).limit(limit))
    return total, list(rows)


def analytics(session, days: int) -> dict:
    """Over the last `days`: searches per day, latency percentiles (ms, the whole search), the categories most
    searched (the first result's) and the images most returned (anywhere in the results)."""
    since = SearchRecord.at >= sa.func.now() - sa.func.make_interval(0, 0, 0, days)
    day = sa.func.date_trunc("day", SearchRecord.at)
    per_day = session.execute(sa.select(day, sa.func.count()).where(since).group_by(day).order_by(day)).all()
    p50, p95, p99 = session.execute(sa.select(*[sa.func.percentile_cont(q).within_group(SearchRecord.total_ms)
                                                for q in (0.5, 0.95, 0.99)]).where(since)).one()
    categories = session.execute(
        sa.select(SearchRecord.top_category, sa.func.count()).where(since, SearchRecord.top_category.is_not(None))
        .group_by(SearchRecord.top_category).order_by(sa.func.count().desc(), SearchRecord.top_category)
        .limit(TOP)).all()
    returned = sa.func.unnest(SearchRecord.result_ids).label("image_id")
    inner = sa.select(returned).where(since).subquery()
    images = session.execute(sa.select(inner.c.image_id, sa.func.count()).group_by(inner.c.image_id)
                             .order_by(sa.func.count().desc(), inner.c.image_id).limit(TOP)).all()
    return {"days": days, "searches": sum(n for _, n in per_day),
            "per_day": [{"day": d.date().isoformat(), "searches": n} for d, n in per_day],
            "latency_ms": {"p50": _round(p50), "p95": _round(p95), "p99": _round(p99)},
            "top_categories": [{"category": c, "searches": n} for c, n in categories],
            "top_images": [{"image_id": i, "times_returned": n} for i, n in images]}


def _round(value) -> float | None:
    return round(float(value), 2) if value is not None else None
