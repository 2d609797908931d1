"""One engine per process for the configured or embedded PostgreSQL, plus migrations."""
import functools
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from backend.config import PROJECT_ROOT, settings
from backend.errors import DatabaseError


@functools.cache
def _embedded_server():
    from backend.pg_server import EmbeddedPostgres

    return EmbeddedPostgres(settings.pg_data_dir, port=settings.embedded_pg_port)


def database_url() -> str:
    """The SQLAlchemy URL in use: the configured server, else the embedded one (started on demand)."""
    external = settings.external_database_url
    if external:
        return normalise_url(external)
    server_url = make_url(_embedded_server().acquire())
    _create_database_if_missing(server_url, settings.db_name)
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


def _create_database_if_missing(server_url, name: str) -> None:
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def create_engine_checked(url: str, schema: str | None = None) -> sa.Engine:
    """An engine for `url`, after checking the server answers and offers pgvector; with `schema` (a collection's,
    backend.collections), every connection looks up tables there first, then in `public`."""
    parsed = make_url(url)
    connect_args = {"options": f"-csearch_path={schema},public"} if schema else {}
    # A server that is down or unreachable fails a connection within about DB_TIMEOUT instead of hanging, and
    # pool_pre_ping swaps out connections that died with it, so the engine recovers once the server is back.
    if parsed.get_driver_name() == "psycopg2" and "connect_timeout" not in parsed.query:  # a URL's own value wins
        connect_args["connect_timeout"] = max(1, round(settings.db_timeout))  # libpq takes whole seconds
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                              pool_timeout=settings.db_timeout + 1, connect_args=connect_args)
    if schema:
        _require_schema_on_checkout(engine, schema)
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


def _require_schema_on_checkout(engine: sa.Engine, schema: str) -> None:
    """Every connection handed out must find `schema` first: once a collection's schema is dropped, its search path
    would fall through to `public` (the default collection's tables), so its connections refuse to serve instead."""
    from backend.errors import NotFound

    @sa.event.listens_for(engine, "checkout")
    def schema_still_there(dbapi_connection, record, proxy):
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            found = cursor.fetchone()[0]
        dbapi_connection.rollback()  # end the transaction the query began: the connection is handed out idle
        if found != schema:
            raise NotFound(f"collection schema {schema} is gone (the collection was deleted)")


def migrated_engine(server_url: str, name: str) -> sa.Engine:
    """An engine on database `name` of the server at `server_url`, created if missing and migrated to head."""
    url = make_url(server_url)
    _create_database_if_missing(url, name)
    engine = create_engine_checked(url.set(database=name).render_as_string(hide_password=False))
    migrate(engine)
    return engine


@functools.cache
def get_engine() -> sa.Engine:
    """The process-wide engine."""
    return create_engine_checked(database_url())


@functools.cache
def collection_sessions():
    """The process-wide backend.collections.CollectionSessions (the engine migrated to head on first use)."""
    from backend.collections import CollectionSessions

    engine = get_engine()
    migrate(engine)
    return CollectionSessions(engine)


def session_factory(collection: str | None = None) -> sessionmaker:
    """Sessions on the process-wide engine for a collection (default: COLLECTION's, which is `default` unless set)."""
    return collection_sessions().sessions(collection or settings.collection)


def close() -> None:
    """Dispose the engines and let go of the embedded server (stopped if no other process uses it)."""
    if collection_sessions.cache_info().currsize:
        collection_sessions().close()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    if _embedded_server.cache_info().currsize:
        _embedded_server().release()
    for cached in (collection_sessions, get_engine, _embedded_server):
        cached.cache_clear()


def _alembic_config(connection, schema: str):
    from alembic.config import Config

    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    return cfg


def _collection_schemas(engine: sa.Engine) -> list[str]:
    """The schemas of the collections other than the default (which lives in `public`)."""
    with engine.connect() as conn:
        if conn.scalar(sa.text("SELECT to_regclass('public.collections')")) is None:
            return []
        return list(conn.scalars(sa.text("SELECT schema FROM public.collections WHERE schema <> 'public' "
                                         "ORDER BY schema")))


def migrate_schema(engine: sa.Engine, schema: str, revision: str = "head", down: bool = False) -> None:
    """Upgrade (or downgrade) one collection's schema to `revision`, in one transaction."""
    with engine.begin() as conn:
        migrate_in(conn, schema, revision, down)


def migrate_in(conn, schema: str, revision: str = "head", down: bool = False) -> None:
    """migrate_schema within a transaction of the caller's (a collection is created and migrated in one)."""
    from alembic import command

    if schema != "public":  # its own tables first, then the shared ones (pgvector's type, the blobs)
        conn.execute(sa.text(f'SET LOCAL search_path TO "{schema}", public'))
    (command.downgrade if down else command.upgrade)(_alembic_config(conn, schema), revision)


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade `public` (the default collection and what collections share) and then every other collection's
    schema to `revision`; safe to repeat."""
    migrate_schema(engine, "public", revision)
    for schema in _collection_schemas(engine):
        migrate_schema(engine, schema, revision)


def downgrade(engine: sa.Engine, revision: str = "base") -> None:
    """Downgrade every collection's schema, then `public`, to `revision`."""
    for schema in _collection_schemas(engine):
        migrate_schema(engine, schema, revision, down=True)
    migrate_schema(engine, "public", revision, down=True)


def current_revision(engine: sa.Engine) -> str | None:
    """The schema's Alembic revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_schema(engine: sa.Engine) -> None:
    """Fail clearly when the database has not been migrated to head."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(Path(PROJECT_ROOT / "migrations"))).get_current_head()
    current = current_revision(engine)
    if current != head:
        raise DatabaseError(f"the database schema is at {current or 'nothing'}, not {head}: run `python -m backend init-db`")
