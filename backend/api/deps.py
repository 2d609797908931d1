"""FastAPI dependencies: the ready ImageSearch, write access, image-job slots and upload reading with limits."""
import functools
import inspect
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, Header, HTTPException, Path, Query, Request, UploadFile
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from backend.api.guard import ImageJobs, body_too_large, write_refusal
from backend.api.schemas import CONTROL_CHARACTERS, MAX_BIGINT, MAX_INTEGER
from backend.config import settings
from backend.service.image_search import ImageSearch
from backend.service.served import ServedCollections
from backend.storage.collections import NAME

RETRY_AFTER_STARTING = "5"  # seconds: the model and index take a few seconds to load
MAX_FILE_NAME = 255
COLLECTION_PATTERN = NAME.pattern


# Dependencies are `async def` where they do not block: FastAPI runs a plain `def` one in its thread pool, a hand-off
# to another thread and back for each, which took more of a search's time than its index on two cores.
async def get_served(request: Request) -> ServedCollections:
    """The collections served (the default's opened at start-up); 503 until the server is ready."""
    if getattr(request.app.state, "collections", None) is None:
        error = getattr(request.app.state, "startup_error", None)
        raise HTTPException(503, f"not ready: {error}" if error else "not ready: the model and index are loading",
                            headers={"Retry-After": RETRY_AFTER_STARTING})
    return request.app.state.collections


ServedDep = Annotated[ServedCollections, Depends(get_served)]


async def get_search(served: ServedDep, collection: Annotated[str | None, Query(
        description="the collection to use (default: the server's, COLLECTION, which is `default` unless set); "
                    "see GET /collections",
        pattern=COLLECTION_PATTERN, max_length=40)] = None) -> ImageSearch:
    """The collection's ImageSearch (opened on its first request); 404 for a collection that does not exist."""
    search = served.opened(collection)
    return search if search is not None else await run_in_threadpool(served.get, collection)  # opening reads


SearchDep = Annotated[ImageSearch, Depends(get_search)]


def in_collection(request: Request, path: str) -> str:
    """`path` in the collection the request named (ids are the collection's own), e.g. /images/7?collection=x."""
    collection = request.query_params.get("collection")
    return f"{path}?{urlencode({'collection': collection})}" if collection else path


def image_urls(request: Request) -> Callable[[int], str]:
    """image id -> where its bytes are, in the request's collection. The route is looked up once per app:
    url_for walks the app's routes: per result it took a tenth of a search's time on the event loop."""
    head = request.scope.get("root_path", "") + _images_path(request.app)
    tail = in_collection(request, "")
    return lambda image_id: f"{head}{image_id}{tail}"


@functools.lru_cache(maxsize=8)
def _images_path(app) -> str:
    return str(app.url_path_for("get_image", image_id=0))[:-1]  # /images/ : the route's path ends in the id


async def require_write_access(request: Request, x_api_key: Annotated[
        str | None, Header(description="required when the server has API_KEY set")] = None) -> None:
    """Writes need X-API-Key to match API_KEY (or OPEN_WRITES without a key), and no foreign Origin.

    backend.api.guard.RequestGuard checks the same before the body is read; this keeps routes safe on their own
    and puts the header in the API docs."""
    refusal = write_refusal(request.url.scheme, request.headers)
    if refusal is not None:
        raise HTTPException(*refusal)


async def image_jobs(request: Request) -> ImageJobs:
    """The app's bounded queue for image decoding and embedding."""
    return request.app.state.image_jobs


ImageJobsDep = Annotated[ImageJobs, Depends(image_jobs)]


async def read_upload(file: UploadFile) -> bytes:
    """The uploaded bytes, refusing (413) more than MAX_UPLOAD_SIZE without reading it all."""
    data = await file.read(settings.max_upload_size + 1)
    if len(data) > settings.max_upload_size:
        raise body_too_large()
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    return data


def clean_file_name(name: str | None) -> str | None:
    """An uploaded file's name as it is stored: control characters dropped, at most 255 characters."""
    if name is None:
        return None
    return CONTROL_CHARACTERS.sub("", name)[-MAX_FILE_NAME:] or None


def query_model(model: type[BaseModel]):
    """A dependency reading `model` from the query string, one parameter per field with the field's constraints,
    alias, description and default (so that the query string and a JSON body share one declaration)."""
    parameters = []
    for name, field in model.model_fields.items():
        extra = {"default_factory": field.default_factory} if field.default_factory else {}
        query = Query(alias=field.alias, description=field.description, **extra)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Annotated[(field.annotation, *field.metadata, query)],
                                            **({} if extra else {"default": field.default})))

    async def from_query(**values) -> BaseModel:
        return model.model_validate({model.model_fields[name].alias or name: value for name, value in values.items()})

    from_query.__signature__ = inspect.Signature(parameters, return_annotation=model)
    return from_query


# Ids and offsets are bounded by what PostgreSQL stores (bigint, integer), so an absurd one is a 422, not a 500.
ImageId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="an image's id")]
CategoryId = Annotated[int, Path(ge=1, le=MAX_INTEGER, description="a category's id")]
