"""DATABASE_URL in each usual spelling, reached over TCP as an external server is, by the CLI and the API; and a
database that is down or never answers fails within DB_TIMEOUT, then is used again once it is back."""
import socket
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from backend.api.app import create_app
from backend.config import settings
from backend.errors import DatabaseError
from backend.service.image_search import ImageSearch
from backend.storage.embedded_server import EmbeddedPostgres
from backend.storage.engine import create_engine_checked, normalise_url
from tests.helpers import PixelEmbedder, free_port, schema_head
from tests.cli.test_cli import run

SCHEMES = ["postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"]


def _spelled(url: str, scheme: str) -> str:
    return scheme + url[url.index("://"):]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cli_runs_against_every_usual_url_over_tcp(cli_env, tcp_url, pg_server, scheme):
    env = {**cli_env, "DATABASE_URL": _spelled(tcp_url, scheme)}
    init = run(env, "-m", "backend", "init-db", timeout=120)
    assert init.returncode == 0 and f"revision {schema_head()}" in init.stdout, init.stderr
    status = run(env, "-m", "backend", "status", timeout=120)
    assert status.returncode == 0, status.stderr
    name = make_url(tcp_url).database
    assert f"database:   postgresql+psycopg2://postgres:***@127.0.0.1:{pg_server[0].port}/{name}\n" in status.stdout
    assert make_url(tcp_url).password not in status.stdout + status.stderr


@pytest.mark.parametrize("scheme", SCHEMES)
def test_api_runs_against_every_usual_url_over_tcp(tcp_url, scheme, tmp_path, monkeypatch):
    url = _spelled(tcp_url, scheme)
    monkeypatch.setattr(settings, "database_url", url)  # what /status reports as embedded or external
    engines = []

    def open_search():
        engines.append(create_engine_checked(normalise_url(url)))
        return ImageSearch(sessionmaker(engines[0], expire_on_commit=False), PixelEmbedder(), snapshot_dir=tmp_path)

    try:
        with TestClient(create_app(open_search)) as client:
            status = client.get("/status")
        assert status.status_code == 200, status.text
        assert status.json()["database"] == "external" and status.json()["images"] == 0
        with engines[0].connect() as conn:  # over TCP indeed: a Unix socket has no server address
            assert conn.execute(sa.text("SELECT host(inet_server_addr())")).scalar() == "127.0.0.1"
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("case", ["unreachable", "wrong password"])
def test_cli_says_in_one_line_that_it_cannot_connect(cli_env, tcp_url, case):
    url = "postgresql://u:p@127.0.0.1:1/x" if case == "unreachable" else \
        make_url(tcp_url).set(password="not-the-password").render_as_string(hide_password=False)
    started = time.monotonic()
    proc = run({**cli_env, "DATABASE_URL": url}, "-m", "backend", "status", timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot connect to PostgreSQL at ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "not-the-password" not in proc.stderr
    if case == "wrong password":
        assert "password authentication failed" in proc.stderr
    assert elapsed < 15, f"{elapsed:.1f} s"  # the interpreter and imports take most of it


def test_a_server_that_never_answers_fails_within_db_timeout(monkeypatch):
    monkeypatch.setattr(settings, "db_timeout", 2.0)
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(DatabaseError, match="cannot connect to PostgreSQL.*timeout expired"):
            create_engine_checked(f"postgresql+psycopg2://u:p@127.0.0.1:{silent.getsockname()[1]}/x")
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 3.5, f"{elapsed:.1f} s"


def test_an_engine_fails_fast_while_its_server_is_down_and_recovers_when_it_is_back(tmp_path):
    server = EmbeddedPostgres(tmp_path / "data", port=free_port())  # its own: this test stops it
    url = make_url(server.acquire()).set(host="127.0.0.1", port=server.port, query={})
    engine = create_engine_checked(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        server.release()  # its only user: this stops it
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        assert time.monotonic() - started < 3
        server.acquire()
        with engine.connect() as conn:  # the same engine, without a restart of anything
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
        server.release()
