"""Who may write, from where, with how large a body, and what odd input gets: each refusal is specific and
comes before the body is read. A real uvicorn server on loopback is used where that timing matters."""
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.app import create_app
from backend.config import settings
from tests.helpers import PixelEmbedder, folder_opener, free_port, png_bytes, wait_healthy

KEY = "k3y-for-tests"


def _file(rgb=(20, 20, 230), name="q.png"):
    return {"file": (name, png_bytes(Image.new("RGB", (32, 32), rgb)), "image/png")}


@pytest.fixture
def open_search(sessions, tmp_path):
    return folder_opener(sessions, tmp_path)


@pytest.fixture
def closed(open_search, monkeypatch):
    """A client of a server with the defaults: no API_KEY, OPEN_WRITES off."""
    monkeypatch.setattr(settings, "api_key", None)
    monkeypatch.setattr(settings, "open_writes", False)
    with TestClient(create_app(open_search)) as c:
        yield c


@pytest.fixture
def keyed(open_search, monkeypatch):
    monkeypatch.setattr(settings, "api_key", KEY)
    with TestClient(create_app(open_search)) as c:
        yield c


WRITES = [("post", "/upload"), ("delete", "/images/1"), ("post", "/admin/rebuild-index"),
          ("post", "/admin/rebuild-prototypes"), ("post", "/admin/refresh")]


@pytest.mark.parametrize("method, path", WRITES)
def test_writes_are_closed_by_default_and_say_how_to_open_them(closed, method, path):
    kwargs = {"files": _file(), "data": {"category": "x"}} if path == "/upload" else {}
    response = getattr(closed, method)(path, **kwargs)
    assert response.status_code == 403 and "API_KEY" in response.json()["detail"]
    assert closed.post("/search", files=_file()).status_code == 200  # reads stay open


def test_open_writes_is_an_explicit_choice_and_the_log_says_so(open_search, monkeypatch, caplog):
    monkeypatch.setattr(settings, "api_key", None)
    monkeypatch.setattr(settings, "open_writes", True)
    with caplog.at_level("INFO", logger="backend.api.app"), \
            TestClient(create_app(open_search), base_url="http://localhost:8000") as c:
        assert c.post("/upload", files=_file((3, 3, 3)), data={"category": "x"}).status_code == 200
        # A page that rebound its own name to this machine sends its own Host and a matching Origin.
        rebound = c.post("/admin/refresh", headers={"Host": "evil.example:8000", "Origin": "http://evil.example:8000"})
        assert rebound.status_code == 403 and "localhost" in rebound.json()["detail"]
    assert "writes are OPEN without a key to requests addressed to localhost" in caplog.text


def test_a_key_opens_writes_and_a_wrong_one_does_not(keyed):
    assert keyed.post("/admin/refresh").status_code == 401
    assert keyed.post("/admin/refresh", headers={"X-API-Key": "wrong"}).status_code == 401
    assert keyed.post("/admin/refresh", headers={"X-API-Key": b"k3y-\xe9"}).status_code == 401  # not ASCII: no 500
    assert keyed.post("/admin/refresh", headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.post("/admin/refresh", headers={"X-API-Key": f" {KEY} "}).status_code == 200  # header whitespace


def test_status_tells_a_caller_of_closed_writes_why_it_cannot_read_the_history(closed):
    # The page shows the history only when this is null, and says this beside its button otherwise.
    assert "needs write access: writes are closed" in closed.get("/status").json()["history_note"]
    assert closed.get("/analytics").status_code == 200 and closed.get("/history").status_code == 403


def test_status_tells_each_keyed_caller_whether_it_may_read_the_history(keyed, monkeypatch):
    assert keyed.get("/status", headers={"X-API-Key": KEY}).json()["history_note"] is None
    assert "X-API-Key" in keyed.get("/status").json()["history_note"]
    monkeypatch.setattr(keyed.app.state.collections.default.history, "days", None)  # HISTORY_ENABLED off
    assert "not recorded" in keyed.get("/status", headers={"X-API-Key": KEY}).json()["history_note"]


def test_cross_origin_writes_are_refused_unless_the_origin_is_allowed(open_search, monkeypatch):
    monkeypatch.setattr(settings, "api_key", None)
    monkeypatch.setattr(settings, "open_writes", True)
    monkeypatch.setattr(settings, "allowed_origins", "https://app.example.com")
    with TestClient(create_app(open_search), base_url="http://localhost") as c:
        before = c.get("/status").json()["index_size"]
        # A page on another site posting a "simple" request (no preflight) to an admin route.
        evil = c.post("/admin/rebuild-index", content=b"x", headers={"Origin": "https://evil.example",
                                                                     "Content-Type": "text/plain"})
        assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
        evil_delete = c.delete("/images/1", headers={"Origin": "https://evil.example"})
        assert evil_delete.status_code == 403 and c.get("/images/1/info").status_code == 200
        assert c.get("/status").json()["index_size"] == before
        same_site = c.post("/admin/refresh", headers={"Origin": "http://localhost"})
        assert same_site.status_code == 200
        allowed = c.post("/admin/refresh", headers={"Origin": "https://app.example.com"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        preflight = c.options("/upload", headers={"Origin": "https://app.example.com",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "X-API-Key"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]


def test_options_lists_every_method_of_a_path_and_image_bytes_are_nosniff(keyed):
    allow = keyed.options("/images/1").headers["allow"]
    assert {"GET", "DELETE", "OPTIONS"} <= set(allow.split(", "))
    image = keyed.get("/images/1")
    assert image.status_code == 200 and image.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method, path, kwargs", [
    ("post", "/search?category=a%00b", {"files": _file()}),
    ("get", "/images/1/similar?category=%00", {}),
    ("get", "/categories/1/images?offset=9223372036854775808", {}),
    ("get", "/categories/1/images?offset=-1", {}),
    ("get", "/images/9223372036854775808", {}),
    ("get", "/images/9223372036854775808/info", {}),
    ("get", "/images/0/similar", {}),
    ("get", "/categories/4294967296/images", {}),
    ("post", "/upload", {"files": _file((1, 2, 3)), "data": {"category": "bad\x00name"}}),
    ("post", "/upload", {"files": _file((1, 2, 3)), "data": {"category_id": "99999999999"}}),
])
def test_odd_input_gets_a_422_problem_not_a_500(keyed, method, path, kwargs):
    response = getattr(keyed, method)(path, headers={"X-API-Key": KEY}, **kwargs)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def _multipart(category: bytes, file_name: bytes) -> tuple[bytes, dict]:
    png = png_bytes(Image.new("RGB", (32, 32), (9, 99, 199)))
    body = (b"--B\r\nContent-Disposition: form-data; name=\"category\"\r\n\r\n" + category + b"\r\n--B\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"" + file_name + b"\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--B--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=B", "X-API-Key": KEY}


def test_invalid_utf8_is_refused_and_control_characters_leave_file_names(keyed):
    body, headers = _multipart(b"caf\xe9", b"ok.png")
    response = keyed.post("/upload", content=body, headers=headers)
    assert response.status_code == 400 and "UTF-8" in response.json()["detail"]
    assert "caf\u00e9" not in {c["name"] for c in keyed.get("/categories").json()}
    body, headers = _multipart("caf\u00e9".encode(), b"a\x00b\x1f.png")
    stored = keyed.post("/upload", content=body, headers=headers)
    assert stored.status_code == 200, stored.text
    info = keyed.get(f"/images/{stored.json()['image_id']}/info").json()
    assert info["category"] == "caf\u00e9" and info["original_name"] == "ab.png"


def test_absurd_file_names_get_a_400_and_long_ones_are_cut_to_255_characters(keyed):
    body, headers = _multipart(b"names", b"a" * 10_000 + b".png")
    absurd = keyed.post("/upload", content=body, headers=headers)
    assert absurd.status_code == 400 and isinstance(absurd.json()["detail"], str)
    body, headers = _multipart(b"names", b"b" * 1_000 + b".png")
    stored = keyed.post("/upload", content=body, headers=headers)
    assert stored.status_code == 200, stored.text
    name = keyed.get(f"/images/{stored.json()['image_id']}/info").json()["original_name"]
    assert len(name) == 255 and name.endswith(".png")


def test_a_duplicate_upload_reports_the_category_it_is_stored_under(keyed):
    first = keyed.post("/upload", files=_file((7, 70, 170)), data={"category": "first"}, headers={"X-API-Key": KEY})
    again = keyed.post("/upload", files=_file((7, 70, 170)), data={"category": "second"}, headers={"X-API-Key": KEY})
    assert again.json()["duplicate"] is True and again.json()["category"] == first.json()["category"] == "first"


def test_error_bodies_match_the_published_schema(keyed):
    spec = keyed.get("/openapi.json").json()
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            schema = operation["responses"]["422"]["content"]["application/json"]["schema"]
            assert schema == problem, (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


# -- at the door: a real server, a raw socket ---------------------------------------------------------------
@pytest.fixture
def live(open_search, monkeypatch):
    """A real uvicorn server on loopback (API_KEY set, 1 MB upload limit); yields its port."""
    monkeypatch.setattr(settings, "api_key", KEY)
    monkeypatch.setattr(settings, "max_upload_size", 1_000_000)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(open_search), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_healthy(f"http://127.0.0.1:{port}", 60)
    yield port
    server.should_exit = True
    thread.join(30)


def _refused_before_the_body(port: int, head: str) -> tuple[str, float]:
    """Send only the request head (promising a large body) and return the response and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(head.encode())
        conn.sendall(b"--B\r\n")  # a first bit of the body, then nothing more
        response = conn.recv(65536).decode("latin-1")
        return response, time.monotonic() - started


@pytest.mark.slow
def test_oversized_and_unauthorised_bodies_are_refused_before_they_are_read(live):
    big = 200 * 1024 * 1024
    head = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Content-Length: {big}\r\n\r\n")
    response, seconds = _refused_before_the_body(live, head)
    assert response.startswith("HTTP/1.1 413") and "MAX_UPLOAD_SIZE" in response and seconds < 2
    head = ("POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            "Content-Length: 900000\r\n\r\n")
    response, seconds = _refused_before_the_body(live, head)
    assert response.startswith("HTTP/1.1 401") and "X-API-Key" in response and seconds < 2


@pytest.mark.slow
def test_a_streamed_body_without_length_is_cut_off_at_the_limit(live):
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(400):  # 400 x 64 KiB = 25 MiB offered
            sent += 65536
            yield b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n".ljust(65536, b"x")

    response = httpx.post(f"http://127.0.0.1:{live}/search", content=chunks(), timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 413 and "1,000,000 bytes" in response.json()["detail"]


def _read_until_closed(conn: socket.socket) -> str:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data.decode("latin-1")


def _read_one_response(conn: socket.socket) -> str:
    """One whole response from `conn` (its head, then Content-Length bytes of body): the head and the body can come
    in separate segments, so a single recv may hold only the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not (chunk := conn.recv(65536)):
            return data.decode("latin-1")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length and (chunk := conn.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


@pytest.mark.slow
def test_slow_bodies_get_a_408_at_their_deadline_and_only_so_many_arrive_at_once(live, monkeypatch):
    monkeypatch.setattr(settings, "body_timeout", 3.0)
    monkeypatch.setattr(settings, "bodies_in_flight", 3)
    head = ("POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            "Content-Length: 500000\r\n\r\n--B\r\n").encode()
    slow = [socket.create_connection(("127.0.0.1", live), timeout=20) for _ in range(3)]
    started = time.monotonic()
    for conn in slow:
        conn.sendall(head)  # a first bit of the body, then a trickle that never ends in time
    for conn in slow:
        # All of the trickle goes before any deadline: bytes sent to a connection the server has already closed
        # make its kernel answer with a reset, which discards the 408 still unread here.
        conn.sendall(b"x" * 10)
    # One more body is refused at once as soon as the server counts the three; a probe sent before that is not
    # answered, and closing it frees its place, so probe until the refusal comes rather than sleep and hope.
    response = ""
    while not response and time.monotonic() - started < 2:
        with socket.create_connection(("127.0.0.1", live), timeout=0.5) as probe:
            probe.sendall(head)
            try:
                response = _read_one_response(probe)
            except TimeoutError:
                continue
    assert response.startswith("HTTP/1.1 503") and "BODIES_IN_FLIGHT" in response, response
    assert "retry-after: 1" in response.lower()
    for conn in slow:
        answer = _read_until_closed(conn)  # the server closes the connection after its answer
        assert answer.startswith("HTTP/1.1 408") and "BODY_TIMEOUT" in answer, answer
        assert "connection: close" in answer.lower()
        conn.close()
    assert 3 <= time.monotonic() - started < 12
    after = httpx.post(f"http://127.0.0.1:{live}/search", files=_file(), timeout=10)  # their places are free again
    assert after.status_code == 200, after.text


class SlowPixels(PixelEmbedder):
    """Runs the model after a pause, so that requests pile up."""

    def _forward(self, batch, precision=None):
        time.sleep(0.5)
        return super()._forward(batch, precision)


@pytest.mark.slow
def test_when_the_image_queue_is_full_the_api_answers_503_with_retry_after(open_search, monkeypatch):
    monkeypatch.setattr(settings, "api_key", KEY)
    monkeypatch.setattr(settings, "embed_workers", 1)
    monkeypatch.setattr(settings, "queue_size", 1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: open_search(SlowPixels())), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 60)
        results = []

        def one():
            results.append(httpx.post(f"http://127.0.0.1:{port}/search", files=_file(), timeout=60))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.should_exit = True
        thread.join(30)
    codes = sorted(r.status_code for r in results)
    busy = [r for r in results if r.status_code == 503]
    assert codes.count(200) >= 2 and busy and set(codes) <= {200, 503}, codes
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in busy)
