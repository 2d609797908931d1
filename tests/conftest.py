"""A real PostgreSQL for the whole test run (imsrc's embedded server), migrated once into a template;
each test that needs a database gets a fresh copy of it."""
import itertools
import os
import signal
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from backend.storage.embedded_server import EmbeddedPostgres
from backend.storage.engine import create_engine_checked
from backend.storage.migrations import migrate

TEMPLATE = "imsrc_template"
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"
_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """DATA_DIR for the whole run, in a temporary folder: nothing is written into the checkout's data/ (snapshots,
    an embedded server's files), in this process or in the processes tests start."""
    from backend.config import settings

    folder = tmp_path_factory.mktemp("data")
    saved, os.environ["DATA_DIR"] = os.environ.get("DATA_DIR"), str(folder)
    settings.data_dir = folder
    yield folder
    if saved is None:
        os.environ.pop("DATA_DIR", None)
    else:
        os.environ["DATA_DIR"] = saved


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """The embedded PostgreSQL server for this test run, in its own data directory; also on TCP, as `tcp_url` uses."""
    from tests.helpers import free_port  # here, not at the top: it imports torch

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", port=free_port())
    url = make_url(server.acquire())
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {TEMPLATE}"))
    template = create_engine_checked(url.set(database=TEMPLATE).render_as_string(hide_password=False))
    migrate(template)
    template.dispose()
    yield server, url, admin
    admin.dispose()
    server.release()


def _new_database(pg_server, template: str | None) -> str:
    _, url, admin = pg_server
    name = f"t{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")))
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def db_url(pg_server):
    """URL of a fresh database migrated to head."""
    return _new_database(pg_server, TEMPLATE)


@pytest.fixture
def other_db_url(pg_server):
    """URL of a second fresh database migrated to head, for comparing two runs."""
    return _new_database(pg_server, TEMPLATE)


@pytest.fixture
def tcp_url(pg_server, db_url):
    """db_url as an external server is reached: postgresql://postgres:<password>@127.0.0.1:<port>/<name>."""
    server = pg_server[0]
    return make_url(db_url).set(drivername="postgresql", host="127.0.0.1", port=server.port,
                                query={}).render_as_string(hide_password=False)


@pytest.fixture
def empty_db_url(pg_server):
    """URL of a fresh, empty database (no schema)."""
    return _new_database(pg_server, None)


@pytest.fixture
def engine(db_url):
    eng = create_engine_checked(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine):
    """A session factory on a fresh migrated database."""
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture(scope="module")
def module_sessions(pg_server):
    """A session factory on a fresh migrated database shared by one test module: for collections its tests only
    read, built once."""
    eng = create_engine_checked(_new_database(pg_server, TEMPLATE))
    yield sessionmaker(eng, expire_on_commit=False)
    eng.dispose()


@pytest.fixture
def folder_client(sessions, tmp_path, monkeypatch):
    """A factory of TestClients, each on the app over a fresh red/green/blue folder collection of `n_per_class`
    images per colour (tests.helpers.folder_opener), with writes open to localhost unless open_writes is False;
    `app_options` go to create_app (open_collection)."""
    from fastapi.testclient import TestClient

    from backend.api.app import create_app
    from backend.config import settings
    from tests.helpers import folder_opener

    entered = []

    def make(n_per_class: int = 4, open_writes: bool = True, **app_options) -> TestClient:
        if open_writes:  # access control has its own tests (tests/api/test_access.py)
            monkeypatch.setattr(settings, "open_writes", True)
        client = TestClient(create_app(folder_opener(sessions, tmp_path, n_per_class), **app_options),
                            base_url="http://localhost")  # open writes: localhost only
        entered.append(client.__enter__())
        return client

    yield make
    for client in reversed(entered):
        client.__exit__(None, None, None)


@pytest.fixture
def output_dir():
    """Where tests leave artefacts for people to look at (screenshots, logs)."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


def _cli_env(db_url: str, data_dir: Path) -> dict:
    from tests.helpers import PINNED_ENGINE

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_", "MODEL_", "EMBED_"))}
    env.update(DATABASE_URL=db_url, DATA_DIR=str(data_dir), MODEL_NAME="efficientnet_lite0",
               BATCH_SIZE="16", PYTHONUNBUFFERED="1", IMSRC_ENV_FILE=os.devnull)  # a developer's .env stays out
    # One engine for every process a test starts: the vectors of a populate and a server agree exactly, and no
    # process pays the engine measurement (~5 s), which tests/embedding and the demo test cover.
    env.update(PINNED_ENGINE)
    return env


@pytest.fixture
def cli_env(db_url, tmp_path):
    """Environment for running `python -m backend` against the test database, offline."""
    return _cli_env(db_url, tmp_path / "data")


@pytest.fixture(scope="module")
def new_cli_env(pg_server, tmp_path_factory):
    """A factory of cli_envs, each on a fresh database, for a module-scoped fixture (a server its tests share)."""
    return lambda: _cli_env(_new_database(pg_server, TEMPLATE), tmp_path_factory.mktemp("env") / "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "minutes: takes minutes; started first, so that no worker ends on it alone")
    # pytest-xdist's own marker, also known when the suite runs without it (-p no:xdist)
    config.addinivalue_line("markers", "xdist_group(name): tests that run in one worker under --dist loadgroup")
    restore_ctrl_c()


def restore_ctrl_c() -> None:
    """Let Ctrl-C interrupt this run and every process it starts, as at a person's terminal.

    A job started in the background by a shell without job control (`(cmd &)`, some CI runners) inherits SIGINT
    ignored, and an ignored signal stays ignored across exec: the tests that send Ctrl-C to a question or to the
    menu then wait forever (the menu's Ctrl-C "race"). A handler, unlike SIG_IGN, is reset to the default at exec,
    so installing Python's own one here gives every child the default too."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    # The longest tests first (a stable sort: every module's tests stay together and in order), so that under
    # pytest-xdist the other worker takes the many short ones meanwhile instead of idling at the end.
    items.sort(key=lambda item: item.get_closest_marker("minutes") is None)
