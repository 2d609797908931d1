"""One engine per process for the configured or embedded PostgreSQL, plus migrations."""
import functools
import os
import shutil

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from backend.config import settings
from backend.errors import DatabaseError

DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full
LOW_DISK_BYTES = 16 * 2**20  # one WAL segment: with less free, the embedded server cannot go on writing
DISK_FULL = ("the database's disk is full, so nothing was written: free space on the disk that holds PostgreSQL's "
             "data, then try again (searches go on working, and deletes do where PostgreSQL can still write)")


@functools.cache
def embedded_server():
    from backend.storage.embedded_server import EmbeddedPostgres

    return EmbeddedPostgres(settings.pg_data_dir, port=settings.embedded_pg_port)


def database_url() -> str:
    """The SQLAlchemy URL in use: the configured server, else the embedded one (started on demand)."""
    external = settings.external_database_url
    if external:
        return normalise_url(external)
    server_url = make_url(embedded_server().acquire())
    create_database_if_missing(server_url, settings.db_name)
    return server_url.set(database=settings.db_name).render_as_string(hide_password=False)


def normalise_url(url: str) -> str:
    """Any usual PostgreSQL URL (postgresql://, postgres://, postgresql+psycopg://) as one the installed driver takes.

    SQLAlchemy maps the plain scheme to psycopg 3, which imsrc does not install; psycopg2 speaks the same protocol."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise DatabaseError(f"DATABASE_URL is not a database URL: expected postgresql://user:password@host:port/name, "
                            f"got {url[:20]!r}...") from None
    driver = parsed.drivername
    if driver in ("postgres", "postgresql") or (driver == "postgresql+psycopg" and not _installed("psycopg")):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    elif driver not in ("postgresql+psycopg2", "postgresql+psycopg"):
        raise DatabaseError(f"DATABASE_URL starts with {driver}://, which imsrc cannot use: it needs PostgreSQL with "
                            "pgvector, as postgresql://user:password@host:port/name")
    return parsed.render_as_string(hide_password=False)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def is_embedded() -> bool:
    """True when imsrc runs on its own embedded server rather than a configured one."""
    return settings.external_database_url is None


def create_database_if_missing(server_url, name: str) -> None:
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def create_engine_checked(url: str) -> sa.Engine:
    """An engine for `url` with the pool of DB_POOL_SIZE (+ DB_POOL_OVERFLOW), after checking the server answers
    and offers pgvector; backend.storage.collections.sessions_in scopes its sessions to one collection."""
    parsed = make_url(url)
    connect_args = {"application_name": application_name()}
    # A server that is down or unreachable fails a connection within about DB_TIMEOUT instead of hanging, and
    # pool_pre_ping swaps out connections that died with it, so the engine recovers once the server is back.
    if parsed.get_driver_name() == "psycopg2" and "connect_timeout" not in parsed.query:  # a URL's own value wins
        connect_args["connect_timeout"] = max(1, round(settings.db_timeout))  # libpq takes whole seconds
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=settings.db_pool_size,
                              max_overflow=settings.db_pool_overflow,
                              pool_timeout=settings.db_timeout + 1, connect_args=connect_args)
    where = parsed.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            has_vector = conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
    except sa.exc.OperationalError as exc:
        engine.dispose()
        # libpq adds hints on lines of their own; the CLI and the API's 503 say it all on one line
        reason = "; ".join(" ".join(line.split()) for line in str(exc.orig).splitlines() if line.strip())
        raise DatabaseError(f"cannot connect to PostgreSQL at {where}: {reason}") from None
    if not has_vector:
        engine.dispose()
        raise DatabaseError(
            f"the PostgreSQL server at {where} does not have the pgvector extension installed. "
            "Install pgvector on that server (https://github.com/pgvector/pgvector#installation), "
            "or unset DATABASE_URL/DB_HOST to use imsrc's embedded PostgreSQL, which ships with it."
        )
    return engine


def application_name(role: str = "") -> str:
    """How this process's connections show in pg_stat_activity: `imsrc <pid>`, plus their role if they have one."""
    return f"imsrc{role} {os.getpid()}"


@functools.cache
def get_engine() -> sa.Engine:
    """The process-wide engine."""
    return create_engine_checked(database_url())


def disk_full(exc: Exception) -> bool:
    """Whether a database error comes from a full disk: PostgreSQL says so (an ERROR, or the PANIC of a WAL write),
    or, on the embedded server, its data folder's disk has less than a WAL segment free (it crashed without saying)."""
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "pgcode", None) == DISK_FULL_SQLSTATE or "No space left on device" in str(orig):
        return True
    if not is_embedded():
        return False
    try:
        return shutil.disk_usage(settings.pg_data_dir).free < LOW_DISK_BYTES
    except OSError:  # not created yet
        return False
