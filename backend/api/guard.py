"""What the API checks before it reads a request's body: who may write, from which web origin, how large the
body may be, and how many image jobs may be under way. Writes are closed unless API_KEY or OPEN_WRITES is set."""
import asyncio
import secrets
from contextlib import asynccontextmanager

from fastapi import HTTPException
from fastapi.routing import APIRoute
from starlette import formparsers
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from backend.config import settings

MULTIPART_SLACK = 64 * 1024  # boundaries, headers and form fields around the uploaded file
RETRY_AFTER_BUSY = "1"  # seconds: image jobs take tens of milliseconds each
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def write_refusal(scheme: str, headers: Headers) -> tuple[int, str] | None:
    """Why a write request must be refused, as (status, message), or None when it may go ahead."""
    origin = headers.get("origin")
    if origin is not None and origin.rstrip("/") not in settings.origins and \
            origin != f"{scheme}://{headers.get('host', '')}":
        return 403, (f"cross-origin write refused: {origin[:100]} is not this server's origin nor in ALLOWED_ORIGINS")
    if settings.api_key:
        given = headers.get("x-api-key", "").strip().encode("latin-1", "replace")
        if not secrets.compare_digest(given, settings.api_key.encode()):
            return 401, "missing or wrong X-API-Key header (this server requires an API key for writes)"
        return None
    if not settings.open_writes:
        return 403, ("writes are closed: this server has no API_KEY. Set API_KEY (clients then send it in the "
                     "X-API-Key header), or OPEN_WRITES=true on a machine only you can reach")
    # Open writes are for this machine: a Host that is not loopback means another machine, or a web page that
    # rebound its own name to this address (DNS rebinding), whose Origin would otherwise match its Host.
    if _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
        return 403, ("writes without an API key are taken only on localhost (OPEN_WRITES): set API_KEY to accept "
                     "writes addressed to this server by another name")
    return None


def _host_name(host: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def body_too_large() -> HTTPException:
    """The 413 for a request body over MAX_UPLOAD_SIZE."""
    return HTTPException(413, f"file too large: the limit is {settings.max_upload_size:,} bytes (MAX_UPLOAD_SIZE)")


def body_too_slow() -> HTTPException:
    """The 408 for a request body that did not arrive within BODY_TIMEOUT seconds; the connection is closed."""
    return HTTPException(408, f"the request body did not arrive within {settings.body_timeout:g} s (BODY_TIMEOUT)",
                         headers={"Connection": "close"})


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


class RequestGuard:
    """ASGI middleware: refuses writes (see write_refusal) and oversized bodies before the body is read, counts
    the bytes of bodies without a Content-Length, gives a body BODY_TIMEOUT seconds to arrive (408) and lets at
    most BODIES_IN_FLIGHT arrive at once (503), answers OPTIONS with every method a path has, and marks every
    response nosniff. Write routes are those that depend on `write_dependency`."""

    def __init__(self, app, routes: list, write_dependency):
        self.app = app
        self.routes = [r for r in routes if isinstance(r, APIRoute)]
        # Decided once here, not on every request: which (methods, path pattern) pairs are writes.
        self.writes = [(r.methods, r.path_regex) for r in self.routes
                       if any(d.call is write_dependency for d in r.dependant.dependencies)]
        self.bodies_arriving = 0  # requests whose body has begun and not ended: slow ones hold a place each

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await JSONResponse({"detail": refusal[1]}, refusal[0])(scope, receive, send)
        if scope["method"] == "OPTIONS" and "access-control-request-method" not in headers:
            methods = self._methods(scope["path"])
            if methods:
                return await Response(status_code=204, headers={"Allow": ", ".join(methods)})(scope, receive, send)
        arriving = _has_body(headers)
        if arriving and self.bodies_arriving >= settings.bodies_in_flight:
            return await JSONResponse({"detail": f"busy: {settings.bodies_in_flight} request bodies are arriving "
                                                 "(BODIES_IN_FLIGHT); try again shortly"}, 503,
                                      headers={"Retry-After": RETRY_AFTER_BUSY})(scope, receive, send)
        limit, received = settings.max_upload_size + MULTIPART_SLACK, 0
        deadline = asyncio.get_running_loop().time() + settings.body_timeout
        self.bodies_arriving += arriving

        async def counted_receive():
            nonlocal received, arriving
            if not arriving:  # the body is in (or there was none): what is left to receive is a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise body_too_slow() from None  # FastAPI renders it while it reads the body, as the 413
            received += len(message.get("body", b""))
            if received > limit:
                raise body_too_large()  # FastAPI renders it while it parses the form
            if not message.get("more_body", False):
                arriving = False
                self.bodies_arriving -= 1
            return message

        async def nosniff_send(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        try:
            await self.app(scope, counted_receive, nosniff_send)
        finally:
            if arriving:  # answered before the whole body came (a refusal, a timeout, a client gone)
                self.bodies_arriving -= 1

    def _refusal(self, scope, headers: Headers) -> tuple[int, str] | None:
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_upload_size + MULTIPART_SLACK):
            return (413, body_too_large().detail) if length.isdigit() else (400, "invalid Content-Length header")
        if self._is_write(scope):
            return write_refusal(scope.get("scheme", "http"), headers)
        return None

    def _is_write(self, scope) -> bool:
        return any(scope["method"] in methods and pattern.match(scope["path"]) for methods, pattern in self.writes)

    def _methods(self, path: str) -> list[str]:
        found = {m for r in self.routes if r.path_regex.match(path) for m in r.methods}
        return sorted(found | {"OPTIONS"}) if found else []


def _strict_decode(data: bytes, codec: str) -> str:
    try:
        return bytes(data).decode(codec or "utf-8")
    except (UnicodeDecodeError, LookupError):
        raise HTTPException(400, "form fields and file names must be UTF-8 text") from None


# Starlette decodes a multipart field that is not valid UTF-8 as Latin-1, which would store a category garbled;
# imsrc refuses it instead. (Its only use is decoding multipart names and values; test_access checks it.)
formparsers._user_safe_decode = _strict_decode


class ImageJobs:
    """At most `workers + queue_size` image requests are under way at once; the rest are refused at once with 503
    and Retry-After, so memory and waiting stay bounded however many requests arrive. Searches then share the
    model through the query batcher (which decodes at most `workers` at once); uploads, which decode and embed on
    their own, also take one of `workers` places."""

    def __init__(self, workers: int, queue_size: int):
        self.capacity = workers + queue_size
        self._embedding = asyncio.Semaphore(workers)
        self._admitted = 0

    @property
    def under_way(self) -> int:
        """Image requests admitted and not yet finished."""
        return self._admitted

    @asynccontextmanager
    async def slot(self, own_embedding: bool = False):
        """Hold a place for one image request; with own_embedding (an upload) then also a worker."""
        if self._admitted >= self.capacity:
            raise HTTPException(503, f"busy: {self.capacity} image requests are already under way; try again "
                                     "shortly", headers={"Retry-After": RETRY_AFTER_BUSY})
        self._admitted += 1
        try:
            if own_embedding:
                async with self._embedding:
                    yield
            else:
                yield
        finally:
            self._admitted -= 1
