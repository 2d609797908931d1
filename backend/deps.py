"""FastAPI dependencies: the ready ImageSearch, upload reading with limits, and the API key check."""
import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, UploadFile

from backend.config import settings
from backend.service import ImageSearch


def get_search(request: Request) -> ImageSearch:
    """The ImageSearch built at start-up; 503 until it is ready."""
    search = getattr(request.app.state, "search", None)
    if search is None:
        error = getattr(request.app.state, "startup_error", None)
        raise HTTPException(503, f"not ready: {error}" if error else "not ready: the model and index are loading")
    return search


SearchDep = Annotated[ImageSearch, Depends(get_search)]


def require_api_key(x_api_key: Annotated[str | None, Header(description="required when API_KEY is set")] = None):
    """Writes need the X-API-Key header to match API_KEY, when one is configured."""
    if settings.api_key and not (x_api_key and secrets.compare_digest(x_api_key, settings.api_key)):
        raise HTTPException(401, "missing or wrong X-API-Key header (this server requires an API key for writes)")


async def read_upload(file: UploadFile) -> bytes:
    """The uploaded bytes, refusing (413) more than MAX_UPLOAD_SIZE without reading it all."""
    data = await file.read(settings.max_upload_size + 1)
    if len(data) > settings.max_upload_size:
        raise HTTPException(413, f"file too large: the limit is {settings.max_upload_size:,} bytes (MAX_UPLOAD_SIZE)")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    return data
