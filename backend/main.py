"""The FastAPI application: `uvicorn backend.main:app` or `python -m backend serve`."""
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from backend.config import PROJECT_ROOT
from backend.database import close as close_database
from backend.errors import DatabaseError, ImsrcError, InvalidImage, ModelUnavailable
from backend.routes import images, search, system
from backend.service import ImageSearch, NotFound

log = logging.getLogger(__name__)


def _status_for(exc: ImsrcError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, InvalidImage):
        return 415 if "unsupported image format" in str(exc) else 400
    if isinstance(exc, (DatabaseError, ModelUnavailable)):
        return 503
    return 400


def create_app(open_search=ImageSearch.open) -> FastAPI:
    """The app; `open_search` builds the ImageSearch at start-up (tests hand in their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.search, app.state.startup_error = None, None
        try:  # the model and index load once, off the event loop
            app.state.search = await run_in_threadpool(open_search)
            notice = await run_in_threadpool(app.state.search.unserved_notice)
            if notice:  # not "ready": the stored images are there but this model cannot search them
                log.warning("serving 0 images: %s", notice)
            else:
                log.info("ready: %d images indexed (%s)", len(app.state.search.index), app.state.search.index_source)
        except ImsrcError as exc:
            app.state.startup_error = str(exc)
            log.error("not ready: %s", exc)
        yield
        if app.state.search is not None:
            await run_in_threadpool(app.state.search.close)
        # Here, not atexit: uvicorn re-raises SIGTERM after shutting down, which skips atexit handlers.
        await run_in_threadpool(close_database)

    app = FastAPI(title="imsrc", version="1.0",
                  description="Image similarity search backed by PostgreSQL: two-stage search (category "
                              "prototypes, then FAISS within the top categories). Writes need the `X-API-Key` "
                              "header when the server has API_KEY set.", lifespan=lifespan)

    @app.exception_handler(ImsrcError)
    async def imsrc_error(request: Request, exc: ImsrcError):
        return JSONResponse({"detail": str(exc)}, status_code=_status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    for router in (system.router, search.router, images.router):
        app.include_router(router)
    app.mount("/app", StaticFiles(directory=PROJECT_ROOT / "frontend", html=True), name="app")
    return app


app = create_app()
