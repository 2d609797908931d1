"""Search history and analytics."""
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend.api.deps import MAX_BIGINT, SearchDep, in_collection, require_write_access
from backend.api.routes.images import WRITE_ERRORS
from backend.api.routes.search import ERRORS, to_out
from backend.api.schemas import SearchOut
from backend.storage.tables import SearchRecord

router = APIRouter(tags=["history"])
RecordId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="a recorded search's id")]
# The history shows what people searched for (their query images): an operator's read, guarded as writes are.
PRIVATE = {"dependencies": [Depends(require_write_access)], "responses": WRITE_ERRORS}


class HistoryEntry(BaseModel):
    id: int
    at: datetime
    kind: str = Field(description="upload, stored (by stored images) or rerun")
    collection: str = Field(description="the collection searched (each keeps its own history)")
    model: str
    params: dict = Field(description="what the search asked for: k, offset, filters (`where`), strategy, ...")
    query_sha256: str | None
    thumbnail_url: str | None = Field(description="a small JPEG of an uploaded query")
    result_ids: list[int]
    result_scores: list[float]
    top_category: str | None
    timings_ms: dict[str, float]
    total_ms: float


class HistoryPage(BaseModel):
    total: int
    offset: int
    entries: list[HistoryEntry]


class DayCount(BaseModel):
    day: str
    searches: int


class Analytics(BaseModel):
    days: int
    searches: int
    per_day: list[DayCount]
    latency_ms: dict[str, float | None] = Field(description="p50, p95, p99 of a whole search (ms)")
    top_categories: list[dict] = Field(description="the first result's category, most searched first")
    top_images: list[dict] = Field(description="images most often among the results")


def _entry(request: Request, row: SearchRecord, collection: str) -> HistoryEntry:
    thumb = in_collection(request, str(request.url_for("history_thumbnail", record_id=row.id).path)) \
        if row.query_thumbnail else None
    return HistoryEntry(id=row.id, at=row.at, kind=row.kind, collection=collection, model=row.model_name, params=row.params,
                        query_sha256=row.query_sha256, thumbnail_url=thumb, result_ids=row.result_ids,
                        result_scores=row.result_scores, top_category=row.top_category, timings_ms=row.timings_ms,
                        total_ms=row.total_ms)


@router.get("/history", response_model=HistoryPage, **PRIVATE)
def search_history(request: Request, search: SearchDep,
                   offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """The searches this service answered, newest first (kept HISTORY_RETENTION_DAYS; none with HISTORY_ENABLED
    off)."""
    total, rows = search.catalog.history_page(offset, limit)
    return HistoryPage(total=total, offset=offset, entries=[_entry(request, r, search.collection) for r in rows])


@router.get("/history/{record_id}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: ERRORS[404], **WRITE_ERRORS},
            dependencies=PRIVATE["dependencies"])
def history_thumbnail(record_id: RecordId, search: SearchDep):
    """A small JPEG of a recorded search's uploaded query."""
    return Response(search.catalog.history_thumbnail(record_id), media_type="image/jpeg")


@router.post("/history/{record_id}/run", response_model=SearchOut, **PRIVATE)
async def run_again(request: Request, record_id: RecordId, search: SearchDep):
    """Run a recorded search again, now: its query's vectors and parameters against the collection as it is."""
    return to_out(request, await run_in_threadpool(search.run_again, record_id))


@router.get("/analytics", response_model=Analytics)
def analytics(search: SearchDep, days: Annotated[int, Query(ge=1, le=3650, description="the last this many days")]
              = 30):
    """Searches per day, latency percentiles, the categories most searched and the images most returned."""
    return search.catalog.analytics(days)
