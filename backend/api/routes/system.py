"""Service info, health, metrics, status and admin rebuilds."""
import os
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from backend.api import telemetry
from backend.api.deps import SearchDep, ServedDep, require_write_access
from backend.api.guard import write_refusal
from backend.api.routes.images import WRITE_ERRORS
from backend.api.schemas import (CheckOut, EngineOut, HealthOut, Problem, RebuildOut, RefreshOut, ServedCollection,
                                 StatusOut)
from backend.service.model_choice import unserved_notice
from backend.storage.engine import is_embedded

router = APIRouter(tags=["system"])


@router.get("/", include_in_schema=True, responses={307: {"description": "browsers go to the web page"}})
def root(request: Request):
    """Browsers are sent to the web page; programs get a short description of the service."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/app/")
    return {"service": "imsrc", "description": "PostgreSQL-backed image similarity search",
            "docs": "/docs", "app": "/app/", "health": "/health", "status": "/status"}


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}},
                                                                   "description": "Prometheus text format"}})
def metrics(request: Request):
    """Prometheus metrics: requests and their latency per route, search stage times, index size and image requests
    under way (with several workers, all of them)."""
    body, content_type = telemetry.exposition(request.app.state)
    return Response(body, media_type=content_type)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "not ready"}})
def health(request: Request):
    """Liveness, plus whether the database answers and the index is loaded (503 until both)."""
    served = getattr(request.app.state, "collections", None)
    search = served.default if served is not None else None
    database = search is not None and search.catalog.reachable()
    ready = database and search is not None
    body = {"status": "ok" if ready else "starting" if search is None else "degraded",
            "database": database, "index": search is not None}
    return JSONResponse(body, status_code=200 if ready else 503)


def _history_note(request: Request, recording: bool) -> str | None:
    """Why this caller cannot read the history (the page says so beside its button), or None when it can."""
    if not recording:
        return "searches are not recorded here (HISTORY_ENABLED is off)"
    refusal = write_refusal(request.url.scheme, request.headers)
    return None if refusal is None else f"reading the history needs write access: {refusal[1]}"


@router.get("/status", response_model=StatusOut, responses={503: {"model": Problem}})
def status(request: Request, search: SearchDep, served: ServedDep):
    """What is stored and served in a collection: counts, model, index type and size, which database; and the
    collections this process has loaded, with their memory."""
    c = search.catalog.counts()
    recording = search.history.days is not None
    return StatusOut(images=c["images"], categories=c["categories"], embeddings=c["embeddings"],
                     prototypes=c["prototypes"], model=search.embedder.name, dim=search.embedder.dim,
                     index_type=search.index.index_type, index_size=len(search.index),
                     index_source=search.index_source, database="embedded" if is_embedded() else "external",
                     notice=unserved_notice(c["embeddings"], search.embedder.name), worker=os.getpid(),
                     sync=search.sync_status(), history=recording, history_note=_history_note(request, recording),
                     collection=search.collection, engine=_engine(search.embedder),
                     served_collections=[ServedCollection(name=c.collection, model=c.embedder.name,
                                                          index_vectors=len(c.index), memory_bytes=c.memory_bytes())
                                         for c in served.served()])


def _engine(embedder) -> EngineOut:
    source = embedder.source  # a derived model runs its base's network
    return EngineOut(runtime=source.runtime_in_use, precision=source.precision,
                     why=f"{source.precision_reason}; {source.runtime_reason}")


async def _timed(search, work) -> RebuildOut:
    started = time.perf_counter()
    await run_in_threadpool(work)
    return RebuildOut(prototypes=len(search.index.categories), indexed_images=len(search.index),
                      seconds=round(time.perf_counter() - started, 3))


@router.post("/admin/rebuild-index", response_model=RebuildOut, responses=WRITE_ERRORS,
             dependencies=[Depends(require_write_access)], tags=["admin"])
async def rebuild_index(search: SearchDep):
    """Recompute prototypes and rebuild the index from PostgreSQL, then snapshot it."""
    return await _timed(search, search.rebuild)


@router.post("/admin/rebuild-prototypes", response_model=RebuildOut, responses=WRITE_ERRORS,
             dependencies=[Depends(require_write_access)], tags=["admin"])
async def rebuild_prototypes(search: SearchDep):
    """Recompute every prototype exactly from its members and reload them into the index."""
    return await _timed(search, search.rebuild_prototypes)


@router.post("/admin/refresh", response_model=RefreshOut, responses=WRITE_ERRORS,
             dependencies=[Depends(require_write_access)], tags=["admin"])
async def refresh(search: SearchDep):
    """Resynchronise the index with the database by hand (live sync does it on its own): returns what changed."""
    added, removed = await run_in_threadpool(search.refresh)
    return RefreshOut(added=added, removed=removed, indexed_images=len(search.index))


@router.get("/admin/check", response_model=CheckOut, responses=WRITE_ERRORS,
            dependencies=[Depends(require_write_access)], tags=["admin"])
async def check(search: SearchDep):
    """Compare this process's index with PostgreSQL (and PostgreSQL's vectors with its prototypes): it reads every
    vector, so it is for operators."""
    report = await run_in_threadpool(search.check)
    return CheckOut(ok=report.ok, summary=report.summary(), findings=report.findings, worker=os.getpid())
