"""The FastAPI application factory and its lifespan (backend.main builds the app uvicorn serves)."""
import io
import logging
import os
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image as PILImage
from starlette.concurrency import run_in_threadpool

from backend.api import telemetry
from backend.api.deps import RETRY_AFTER_STARTING, require_write_access
from backend.api.docs_pages import add_docs_pages
from backend.api.guard import ImageJobs, RequestGuard
from backend.api.routes import collections, duplicates, history, images, search, system
from backend.config import PROJECT_ROOT, settings, writes_mode
from backend.errors import DatabaseError, ImsrcError, http_status
from backend.service.image_search import ImageSearch
from backend.service.served import ServedCollections, open_collection
from backend.storage.engine import DISK_FULL, disk_full
from backend.storage.sessions import close as close_database
from backend.storage.sessions import supervise as supervise_database

log = logging.getLogger(__name__)
RETRY_AFTER_DISK = "30"  # seconds: space comes back when a person frees it, not by itself


def warm_up_query() -> bytes:
    """A PNG to search with before serving, so that the first person to search does not pay for setting up the
    query path (kernels, the model thread, decoder plugins, the web stack)."""
    gradient = PILImage.linear_gradient("L").resize((320, 240)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    return buffer.getvalue()


async def _search_once(app: FastAPI, png: bytes) -> None:
    """POST /search through the whole app, in process, before it reports ready: everything a search uses for the
    first time (the web stack, the multipart parser, decoding, the model thread, the look-ups) is paid for here."""
    boundary = "imsrc-warm-up"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="warm-up.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "query_string": b"limit=1", "root_path": "",
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", settings.api_port),
             "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()),
                         (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status = []

    async def receive():
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        log.warning("the warm-up search answered %s", status)


def _lifespan(open_search, open_collection):
    """The app's lifespan: the default collection opened and warmed up before it reports ready, closed at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.collections, app.state.startup_error = None, None
        supervise_database()  # from the start: a server that dies while the model loads is started again too
        try:  # the model and index load once, off the event loop
            search = await run_in_threadpool(open_search)
            served = ServedCollections(search, open_collection, (settings.query_batch, settings.embed_workers),
                                       settings.history_retention_days if settings.history_enabled else None)
            app.state.collections = served  # ready from here: what other processes write is searchable here too
            await _search_once(app, warm_up_query())
            if settings.history_enabled:  # from now on: the warm-up search is not one of the history's
                search.start_history(settings.history_retention_days)
            notice = await run_in_threadpool(search.unserved_notice)
            if notice:  # not "ready": the stored images are there but this model cannot search them
                log.warning("serving 0 images: %s", notice)
            else:
                log.info("ready: %d images indexed (%s)", len(search.index), search.index_source)
            telemetry.update_gauges(app.state)
        except (ImsrcError, sa.exc.SQLAlchemyError) as exc:
            app.state.startup_error = str(exc).splitlines()[0] if isinstance(exc, sa.exc.SQLAlchemyError) else str(exc)
            log.error("not ready: %s", app.state.startup_error)
        log.info("%s", writes_mode())
        yield
        if app.state.collections is not None:
            await run_in_threadpool(app.state.collections.close)
        telemetry.mark_process_dead(os.getpid())
        # Here, not atexit: uvicorn re-raises SIGTERM after shutting down, which skips atexit handlers.
        await run_in_threadpool(close_database)
    return lifespan


def create_app(open_search=ImageSearch.open, open_collection=open_collection) -> FastAPI:
    """The app; `open_search` builds the default collection's ImageSearch at start-up, `open_collection(name,
    sessions)` another's on its first request (tests hand in their own)."""

    app = FastAPI(title="imsrc", version="1.0",
                  description="Image similarity search backed by PostgreSQL: two-stage search (category "
                              "prototypes, then FAISS within the top categories). Writes (upload, delete, admin) "
                              "need the `X-API-Key` header when the server has API_KEY set, and are refused "
                              "when it has none unless OPEN_WRITES is on.", lifespan=_lifespan(open_search, open_collection),
                  docs_url=None, redoc_url=None)  # add_docs_pages serves them without a CDN
    app.state.image_jobs = ImageJobs(settings.embed_workers, settings.queue_size)

    @app.exception_handler(ImsrcError)
    async def imsrc_error(request: Request, exc: ImsrcError):
        if isinstance(exc, DatabaseError):
            return await database_unreachable(request, exc)
        status = http_status(exc)
        headers = {"Retry-After": RETRY_AFTER_STARTING} if status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    @app.exception_handler(sa.exc.TimeoutError)
    async def database_unreachable(request: Request, exc: Exception):
        # Connection-level failures only: anything else is a bug and stays a 500. What failed, and where the
        # database is (its URL, host or socket path), goes to the log, never to a client.
        if disk_full(exc):
            log.warning("database disk full: %s", str(exc).splitlines()[0])
            return JSONResponse({"detail": DISK_FULL}, status_code=507, headers={"Retry-After": RETRY_AFTER_DISK})
        log.warning("database unreachable: %s", str(exc).splitlines()[0])
        return JSONResponse({"detail": "the database cannot be reached; try again shortly"}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_STARTING})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    routers = (system.router, collections.router, search.router, images.router, duplicates.router, history.router)
    for router in routers:
        app.include_router(router)
    add_docs_pages(app)
    app.mount("/app", StaticFiles(directory=PROJECT_ROOT / "frontend", html=True), name="app")
    # The routers' own routes: FastAPI wraps included routers, so the app's route list does not show them.
    app.add_middleware(RequestGuard, routes=[r for router in routers for r in router.routes],
                       write_dependency=require_write_access)
    if settings.origins:  # other sites' pages may call the API (the guard still checks their writes' keys)
        app.add_middleware(CORSMiddleware, allow_origins=settings.origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key"], max_age=600)
    app.add_middleware(telemetry.RequestTelemetry)  # outermost: its id and timing cover everything above
    app.openapi = lambda: _openapi(app)
    return app


# Every error body is a Problem; these can come from any operation (the request guard, validation, an outage).
COMMON_ERRORS = {"400": "malformed request", "413": "body larger than MAX_UPLOAD_SIZE",
                 "422": "a parameter is missing or out of range", "503": "not ready, busy or database unreachable",
                 "507": "the database's disk is full"}


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, with every error response described as the Problem body the API sends."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path in spec["paths"].values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                if any(p.get("name") == "collection" for p in operation.get("parameters", [])):
                    responses.setdefault("404", {"description": "no such collection", "content": problem})
                for code, description in COMMON_ERRORS.items():
                    given = responses.get(code, {})
                    if code == "422" or "content" not in given:  # FastAPI's own 422 is not what the API sends
                        responses[code] = {"description": given.get("description", description), "content": problem}
        for unused in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = spec
    return app.openapi_schema

