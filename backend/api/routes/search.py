"""Search endpoints: by uploaded images, by stored images, prototypes only; and the same searches as downloads."""
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from backend.api import telemetry
from backend.api.deps import MAX_BIGINT, ImageId, ImageJobsDep, SearchDep, image_urls, query_model, read_upload
from backend.api.schemas import ExamplesIn, ExportExamplesIn, Problem, QueryOptions, SearchOut
from backend.embedding.query_edits import CROP_PATTERN, QueryEdit
from backend.search.examples import MAX_EXAMPLES
from backend.service import export
from backend.service.requests import default_limit, default_top_categories
from backend.service.results import MAX_DEPTH, SearchResponse
from backend.storage import filters

router = APIRouter(tags=["search"])

ERRORS = {400: {"model": Problem, "description": "not a decodable image"},
          404: {"model": Problem, "description": "unknown category or image"},
          413: {"model": Problem, "description": "file larger than MAX_UPLOAD_SIZE"},
          415: {"model": Problem, "description": "unsupported image format"},
          422: {"model": Problem, "description": "a parameter out of range, or a filter, example or region that "
                                                 "cannot be used"},
          503: {"model": Problem, "description": "model, index or database not ready, or too busy (see Retry-After)"}}
EXPORTED = {200: {"description": "the results as a file (Content-Disposition: attachment)",
                  "content": {media.split(";")[0]: {} for media in export.FORMATS.values()}}, **ERRORS}

Limit = Annotated[int, Query(ge=1, le=50, default_factory=default_limit,
                             description="number of results (one page; default DEFAULT_SEARCH_LIMIT)")]
# With at most 50 per page, offset + limit stays within the MAX_DEPTH results a search can page through.
Offset = Annotated[int, Query(ge=0, le=MAX_DEPTH - 50, description="results to skip (a page's first rank is offset "
                              "+ 1); the pages of one query share one ranking")]
ExportLimit = Annotated[int, Query(ge=1, le=export.MAX_ROWS, description="number of results in the file")]
Format = Annotated[Literal["csv", "json", "zip"], Query(description="csv or json: one row per result; zip: the "
                                                        f"images (at most {export.ZIP_MAX_IMAGES}, "
                                                        f"{export.ZIP_MAX_BYTES // 2**20} MiB) and manifest.json")]
StoredIds = Annotated[list[Annotated[int, Query(ge=1, le=MAX_BIGINT)]], Query(max_length=MAX_EXAMPLES)]
Crop = Annotated[str | None, Query(max_length=100, pattern=CROP_PATTERN,
                                   description="search only this region of each uploaded image: x,y,w,h in pixels "
                                   "of the upright image, or as fractions of its width and height when written with "
                                   "a decimal point (0.5,0,0.5,0.5 is the top-right quarter)")]


OptionsDep = Annotated[QueryOptions, Depends(query_model(QueryOptions))]


def to_out(request: Request, response: SearchResponse) -> SearchOut:
    """Add image URLs to a service response (and count its stage times in the metrics)."""
    telemetry.observe_stages(response.timings_ms)
    return SearchOut(**_with_urls(request, response))


def _with_urls(request: Request, response: SearchResponse) -> dict:
    body, url = response.to_dict(), image_urls(request)
    for hit in body["results"]:
        hit["image_url"] = url(hit["image_id"])
    return body


async def _download(request: Request, jobs, search, response: SearchResponse, fmt: str, query: dict) -> Response:
    """The results as a file; a ZIP is built in an image-job slot (it reads the images) and streamed."""
    results = _with_urls(request, response)["results"]
    headers = {"Content-Disposition": f'attachment; filename="imsrc-results.{fmt}"'}
    if fmt == "csv":
        return Response(export.to_csv(results), media_type=export.FORMATS[fmt], headers=headers)
    if fmt == "json":
        return Response(export.to_json(results, query), media_type=export.FORMATS[fmt], headers=headers)
    async with jobs.slot():
        spool = await run_in_threadpool(export.to_zip, results, query, search.sessions)
    return StreamingResponse(iterate_in_threadpool(_chunks(spool)), media_type=export.FORMATS[fmt], headers=headers)


def _chunks(spool, size: int = 1 << 20):
    with spool:
        while chunk := spool.read(size):
            yield chunk


def _filters_form(text: str | None) -> list:
    return filters.from_json(filters.load_json(text, "filters")) if text is not None else []


FiltersForm = Annotated[str | None, Form(alias="filters", max_length=20_000, description="a metadata filter as a "
                                         "JSON object: "
                                         '{"colour": "red", "year": {"gte": 2000}, "tags": {"in": ["a", "b"]}, '
                                         '"signed": {"exists": true}} (all must hold, with the `filter` terms)')]
Files = Annotated[list[UploadFile], File(description="the query image; several files are several positive examples")]
NegativeFiles = Annotated[list[UploadFile] | None, File(description="images the results should not look like")]
Rotate = Annotated[int, Query(ge=0, le=270, multiple_of=90, description="degrees to rotate each uploaded image "
                              "clockwise (0, 90, 180 or 270), after the crop")]
Flip = Annotated[Literal["horizontal", "vertical"] | None, Query(description="mirror each uploaded image, last")]


async def _upload_search(search, jobs, file, negative_file, positive_id, negative_id, filters_form, crop, rotate, flip,
                         options: QueryOptions, limit: int, offset: int) -> SearchResponse:
    """A search by uploaded (and stored) examples, in an image-job slot: what POST /search and its export share."""
    negatives = negative_file or []
    if len(file) + len(negatives) + len(positive_id) + len(negative_id) > MAX_EXAMPLES:
        raise HTTPException(422, f"at most {MAX_EXAMPLES} examples (files and ids) per search")
    request = options.request(limit, offset, _filters_form(filters_form), QueryEdit.parse(crop, rotate, flip))
    async with jobs.slot():
        uploads = [await read_upload(f) for f in file]
        unwanted = [await read_upload(f) for f in negatives]
        return await run_in_threadpool(search.search, request, uploads + list(positive_id),
                                       unwanted + list(negative_id))


@router.post("/search", response_model=SearchOut, responses=ERRORS)
async def search(request: Request, *, search: SearchDep, jobs: ImageJobsDep, options: OptionsDep, file: Files,
                 negative_file: NegativeFiles = None, filters_json: FiltersForm = None,
                 positive_id: StoredIds = [], negative_id: StoredIds = [],  # noqa: B006 - FastAPI copies defaults
                 crop: Crop = None, rotate: Rotate = 0, flip: Flip = None, limit: Limit, offset: Offset = 0):
    """Find the stored images most similar to the uploaded one (cropped, rotated or flipped first if asked); with
    several files, or stored images' ids, more like all of them, and less like the negative ones."""
    response = await _upload_search(search, jobs, file, negative_file, positive_id, negative_id, filters_json, crop,
                                    rotate, flip, options, limit, offset)
    return to_out(request, response)


@router.post("/search/export", response_class=Response, responses=EXPORTED)
async def search_export(request: Request, search: SearchDep, jobs: ImageJobsDep, options: OptionsDep, file: Files,
                        format: Format, negative_file: NegativeFiles = None, filters_json: FiltersForm = None,
                        positive_id: StoredIds = [], negative_id: StoredIds = [],  # noqa: B006
                        crop: Crop = None, rotate: Rotate = 0, flip: Flip = None, limit: ExportLimit = 100):
    """The same search as POST /search, as a file: its first `limit` results."""
    response = await _upload_search(search, jobs, file, negative_file, positive_id, negative_id, filters_json, crop,
                                    rotate, flip, options, limit, 0)
    query = {"uploaded_images": len(file), "positive_ids": positive_id, "negative_ids": negative_id, "crop": crop,
             "rotate": rotate, "flip": flip, "filter": request.query_params.getlist("filter"), "filters": filters_json}
    return await _download(request, jobs, search, response, format, query)


def _examples_search(search, body: ExamplesIn, offset: int) -> SearchResponse:
    return search.search(body.request(body.limit, offset), body.positive_ids, body.negative_ids)


@router.post("/search/examples", response_model=SearchOut, responses=ERRORS)
async def search_examples(request: Request, search: SearchDep, body: ExamplesIn):
    """More like these stored images, less like those: the JSON form of a search, filter included."""
    response = await run_in_threadpool(_examples_search, search, body, body.offset)
    return to_out(request, response)


@router.post("/search/examples/export", response_class=Response, responses=EXPORTED)
async def search_examples_export(request: Request, search: SearchDep, jobs: ImageJobsDep, body: ExportExamplesIn,
                                 format: Format):
    """The same search as POST /search/examples, as a file."""
    response = await run_in_threadpool(_examples_search, search, body, 0)
    return await _download(request, jobs, search, response, format, body.model_dump())


@router.post("/search/prototypes", response_model=SearchOut, responses=ERRORS)
async def search_prototypes(request: Request, search: SearchDep, jobs: ImageJobsDep,
                            file: Annotated[UploadFile, File(description="query image")],
                            prototype_limit: Annotated[int, Query(ge=1, le=10, default_factory=default_top_categories,
                                                                  description="categories to list")]):
    """Rank the category prototypes against the uploaded image (stage 1 only)."""
    async with jobs.slot():
        data = await read_upload(file)
        response = await run_in_threadpool(search.rank_prototypes, data, prototype_limit)
    return to_out(request, response)


@router.get("/images/{image_id}/similar", response_model=SearchOut, responses=ERRORS)
async def similar_to_stored(request: Request, *, search: SearchDep, image_id: ImageId, options: OptionsDep,
                            limit: Limit, offset: Offset = 0):
    """More like this: search with a stored image (the image itself is left out)."""
    response = await run_in_threadpool(search.search, options.request(limit, offset), [image_id])
    return to_out(request, response)


@router.get("/images/{image_id}/similar/export", response_class=Response, responses=EXPORTED)
async def similar_to_stored_export(request: Request, search: SearchDep, jobs: ImageJobsDep, image_id: ImageId,
                                   options: OptionsDep, format: Format, limit: ExportLimit = 100):
    """The same search as GET /images/{image_id}/similar, as a file."""
    response = await run_in_threadpool(search.search, options.request(limit), [image_id])
    query = {"image_id": image_id, "filter": request.query_params.getlist("filter")}
    return await _download(request, jobs, search, response, format, query)
