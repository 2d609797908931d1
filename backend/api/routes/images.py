"""Stored images: upload, bytes, info, delete; categories and their images."""
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from backend.api.deps import (MAX_INTEGER, CategoryId, ImageId, ImageJobsDep, SearchDep,
                              clean_file_name, image_urls, read_upload, require_write_access)
from backend.api.routes.search import ERRORS
from backend.api.schemas import CATEGORY_PATTERN, CategoryOut, ImageInfo, ImagePage, MetadataKey, Problem, UploadOut
from backend.storage.filters import key_problem, load_json

router = APIRouter(tags=["images"])
MAX_METADATA = 10_000  # characters of an upload's metadata JSON

CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                 "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
NOT_FOUND = {404: {"model": Problem, "description": "unknown id"}}
WRITE_ERRORS = {**ERRORS, 401: {"model": Problem, "description": "missing or wrong API key"},
                403: {"model": Problem, "description": "writes are closed (no API_KEY), or a foreign Origin"},
                422: {"model": Problem, "description": "no category given, or a bad parameter"}}


def info_out(request: Request, image, category: str | None) -> ImageInfo:
    return ImageInfo(image_id=image.id, sha256=image.sha256, width=image.width, height=image.height, format=image.format,
                     category=category, category_id=image.category_id, label=image.label,
                     original_name=image.original_name, source_dataset=image.source_dataset,
                     source_split=image.source_split, metadata=image.metadata_, created_at=image.created_at,
                     image_url=image_urls(request)(image.id))


def _find(search, image_id: int, with_data: bool = False):
    return search.catalog.image(image_id, with_data)


@router.post("/upload", response_model=UploadOut, responses=WRITE_ERRORS, dependencies=[Depends(require_write_access)])
async def upload(request: Request, search: SearchDep, jobs: ImageJobsDep,
                 file: Annotated[UploadFile, File(description="the image")],
                 category: Annotated[str | None, Form(max_length=200, pattern=CATEGORY_PATTERN,
                                                      description="category name (created if new)")] = None,
                 category_id: Annotated[int | None, Form(ge=1, le=MAX_INTEGER,
                                                         description="or an existing category's id")] = None,
                 metadata: Annotated[str | None, Form(max_length=MAX_METADATA, description="what to store about the "
                                                     "image, as a JSON object (searches filter on its keys)")] = None):
    """Store an image under a category, embed it and add it to the index; a duplicate returns the existing id
    and the category it is stored under (its metadata unchanged)."""
    stored_metadata = _metadata(metadata)
    if category_id is not None:
        category = search.catalog.category_name(category_id)
    if not category or not category.strip():
        raise HTTPException(422, "give the image a category: form field `category` (name) or `category_id`")
    async with jobs.slot(own_embedding=True):
        data = await read_upload(file)
        added = await run_in_threadpool(search.add_image, data, category.strip(), clean_file_name(file.filename),
                                        stored_metadata)
    stored_category = _find(search, added.image_id)[1] if added.duplicate else category.strip()
    return UploadOut(image_id=added.image_id, duplicate=added.duplicate, category=stored_category,
                     image_url=image_urls(request)(added.image_id))


def _metadata(text: str | None) -> dict | None:
    """An upload's metadata field: a JSON object whose keys filters can name."""
    if text is None:
        return None
    value = load_json(text, "metadata")
    if not isinstance(value, dict):
        raise HTTPException(422, "metadata: give a JSON object of keys and values, such as {\"colour\": \"red\"}")
    problem = next((p for p in map(key_problem, value) if p is not None), None)
    if problem is not None:
        raise HTTPException(422, f"metadata: {problem}")
    return value


@router.get("/metadata/keys", response_model=list[MetadataKey])
def metadata_keys(search: SearchDep):
    """The metadata keys stored, most common first (at most 50): for each, how many images have it, its most common
    values or its range of numbers; what the page offers as filters."""
    return search.metadata_keys()


@router.get("/images/{image_id}", responses={200: {"content": {"image/*": {}}}, **NOT_FOUND},
            response_class=Response)
def get_image(image_id: ImageId, search: SearchDep, request: Request):
    """The stored image bytes, with their content type; cacheable forever (content-addressed ETag)."""
    image, _ = _find(search, image_id, with_data=True)
    etag = f'"{image.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(image.data, media_type=CONTENT_TYPES.get(image.format, "application/octet-stream"), headers=headers)


@router.get("/images/{image_id}/info", response_model=ImageInfo, responses=NOT_FOUND)
def get_image_info(image_id: ImageId, search: SearchDep, request: Request):
    """What is stored about an image."""
    image, category = _find(search, image_id)
    return info_out(request, image, category)


@router.delete("/images/{image_id}", status_code=204, responses={**NOT_FOUND, 401: WRITE_ERRORS[401],
                                                                 403: WRITE_ERRORS[403]},
               dependencies=[Depends(require_write_access)])
async def delete_image(image_id: ImageId, search: SearchDep):
    """Delete an image, its vectors, and its share of its category's prototype."""
    await run_in_threadpool(search.delete_image, image_id)
    return Response(status_code=204)


@router.get("/categories", response_model=list[CategoryOut], tags=["categories"])
def categories(search: SearchDep):
    """Every category with its number of images."""
    return [CategoryOut(category_id=i, name=n, image_count=c, automatic=a) for i, n, c, a in search.catalog.categories()]


@router.get("/categories/{category_id}/images", response_model=ImagePage, responses=NOT_FOUND, tags=["categories"])
def category_images(category_id: CategoryId, search: SearchDep, request: Request,
                    offset: Annotated[int, Query(ge=0, le=MAX_INTEGER)] = 0, limit: Annotated[int, Query(ge=1, le=200)] = 50):
    """One page of a category's images, oldest first."""
    total, rows = search.catalog.category_images(category_id, offset, limit)
    return ImagePage(category_id=category_id, total=total, offset=offset, limit=limit,
                     images=[info_out(request, image, name) for image, name in rows])
