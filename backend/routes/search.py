"""Search endpoints: by uploaded image, by stored image, prototypes only."""
from typing import Annotated

from functools import partial

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from backend.config import settings
from backend.deps import CATEGORY_PATTERN, ImageId, ImageJobsDep, SearchDep, read_upload
from backend.schemas import Problem, SearchOut
from backend.service import MAX_DEPTH, SearchResponse

router = APIRouter(tags=["search"])

ERRORS = {400: {"model": Problem, "description": "not a decodable image"},
          404: {"model": Problem, "description": "unknown category or image"},
          413: {"model": Problem, "description": "file larger than MAX_UPLOAD_SIZE"},
          415: {"model": Problem, "description": "unsupported image format"},
          422: {"model": Problem, "description": "a parameter out of range"},
          503: {"model": Problem, "description": "model, index or database not ready, or too busy (see Retry-After)"}}

Limit = Annotated[int, Query(ge=1, le=50, description="number of results (one page)")]
# With at most 50 per page, offset + limit stays within the MAX_DEPTH results a search can page through.
Offset = Annotated[int, Query(ge=0, le=MAX_DEPTH - 50, description="results to skip (a page's first rank is offset "
                              "+ 1); the pages of one query share one ranking")]
MinScore = Annotated[float | None, Query(ge=-1, le=1, description="leave out results scoring less")]
PrototypeLimit = Annotated[int, Query(ge=1, le=10, description="categories searched after the prototype stage")]
UsePrototypes = Annotated[bool, Query(description="two-stage search; false searches every category")]
CategoryFilter = Annotated[str | None, Query(max_length=200, pattern=CATEGORY_PATTERN,
                                            description="only this category (name)")]


def to_out(request: Request, response: SearchResponse) -> SearchOut:
    """Add image URLs to a service response."""
    body = response.to_dict()
    for hit in body["results"]:
        hit["image_url"] = str(request.url_for("get_image", image_id=hit["image_id"]).path)
    return SearchOut(**body)


@router.post("/search", response_model=SearchOut, responses=ERRORS)
async def search(request: Request, search: SearchDep, jobs: ImageJobsDep,
                 file: Annotated[UploadFile, File(description="query image")],
                 limit: Limit = settings.default_search_limit,
                 use_prototypes: UsePrototypes = settings.use_prototype_filtering,
                 prototype_limit: PrototypeLimit = settings.prototype_limit, category: CategoryFilter = None,
                 offset: Offset = 0, min_score: MinScore = None):
    """Find the stored images most similar to the uploaded one."""
    async with jobs.slot():
        data = await read_upload(file)
        response = await run_in_threadpool(partial(search.search_similar, offset=offset, min_score=min_score), data,
                                           limit, use_prototypes, prototype_limit, category)
    return to_out(request, response)


@router.post("/search/prototypes", response_model=SearchOut, responses=ERRORS)
async def search_prototypes(request: Request, search: SearchDep, jobs: ImageJobsDep,
                            file: Annotated[UploadFile, File(description="query image")],
                            prototype_limit: PrototypeLimit = settings.prototype_limit):
    """Rank the category prototypes against the uploaded image (stage 1 only)."""
    async with jobs.slot():
        data = await read_upload(file)
        response = await run_in_threadpool(search.rank_prototypes, data, prototype_limit)
    return to_out(request, response)


@router.get("/images/{image_id}/similar", response_model=SearchOut, responses=ERRORS)
async def similar_to_stored(request: Request, search: SearchDep, image_id: ImageId,
                            limit: Limit = settings.default_search_limit,
                            use_prototypes: UsePrototypes = settings.use_prototype_filtering,
                            prototype_limit: PrototypeLimit = settings.prototype_limit,
                            category: CategoryFilter = None, offset: Offset = 0, min_score: MinScore = None):
    """More like this: search with a stored image (the image itself is left out)."""
    response = await run_in_threadpool(search.search_by_id, image_id, limit, use_prototypes, prototype_limit, category,
                                       offset, min_score)
    return to_out(request, response)
