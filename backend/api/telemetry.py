"""What the service tells its operators: a request id in every log line, and Prometheus metrics at GET /metrics.

With several workers (`serve --workers N`) every process writes its metrics to PROMETHEUS_MULTIPROC_DIR (serve sets
it) and /metrics, whichever worker answers, sums them (prometheus_client's multiprocess mode).
"""
import contextvars
import logging
import os
import re
import time
import uuid

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)

REQUEST_ID_HEADER = "x-request-id"
_GIVEN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # an id a proxy sent along: kept if it is this tame
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Seconds: from a cached page (1 ms) to a cold model on a slow CPU (10 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUESTS = Counter("imsrc_requests", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram("imsrc_request_seconds", "time to answer an HTTP request", ["method", "route"], buckets=BUCKETS)
STAGES = Histogram("imsrc_search_stage_seconds", "time of each stage of a search (embedding, search, lookup, ...)",
                   ["stage"], buckets=BUCKETS)
INDEX_VECTORS = Gauge("imsrc_index_vectors", "vectors in this process's index of a collection",
                      ["collection", "model", "index_type"], multiprocess_mode="liveall")
INDEX_BYTES = Gauge("imsrc_index_bytes", "memory this process's index of a collection holds", ["collection"],
                    multiprocess_mode="liveall")
QUEUE_DEPTH = Gauge("imsrc_image_jobs", "image requests (searches, uploads) under way in this process",
                    multiprocess_mode="livesum")


SIZES_EVERY = 1.0  # seconds between two settings of the index-size gauges by requests
_sizes_set = [-float("inf")]  # when this process last set them (time.monotonic)


class RequestIdFilter(logging.Filter):
    """Gives every log record the id of the request it was logged for ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def observe_stages(timings_ms: dict[str, float]) -> None:
    """Record a search's per-stage times (its response's timings_ms)."""
    for stage, ms in timings_ms.items():
        STAGES.labels(stage).observe(ms / 1000)


def update_gauges(app_state, every: float = 0.0) -> None:
    """Set this process's image requests under way and its index sizes per collection loaded; the sizes only if
    `every` seconds passed since they were last set (they walk the index: after every request they were a tenth of
    a search's time on the event loop, so requests set them once a second and a scrape of /metrics every time)."""
    QUEUE_DEPTH.set(app_state.image_jobs.under_way)
    now = time.monotonic()
    if now - _sizes_set[0] < every:
        return
    _sizes_set[0] = now
    served = getattr(app_state, "collections", None)
    searches = served.served() if served is not None else []
    # Only what is served now: a deleted collection's series, or those of a model switched away from, go.
    INDEX_VECTORS.clear()
    INDEX_BYTES.clear()
    for search in searches:
        INDEX_VECTORS.labels(search.collection, search.embedder.name, search.manager.index_type).set(len(search.index))
        INDEX_BYTES.labels(search.collection).set(search.memory_bytes())


def exposition(app_state) -> tuple[bytes, str]:
    """The metrics in the Prometheus text format, with the gauges as of now."""
    update_gauges(app_state)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


class RequestTelemetry:
    """ASGI middleware: gives each HTTP request an id (the caller's X-Request-ID when it is tame, else a new one),
    returns it in X-Request-ID and puts it in every log line, and counts and times the request by its route's
    template (so /images/7 and /images/8 are one series)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _GIVEN_ID.match(given) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        started, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("/app" if scope["path"].startswith("/app") else "unmatched")
            REQUESTS.labels(scope["method"], template, str(status[0])).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
            update_gauges(scope["app"].state, every=SIZES_EVERY)
            request_id.reset(token)
