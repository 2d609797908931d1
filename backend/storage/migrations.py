"""Alembic migrations of `public` and of every collection's schema."""
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from backend.config import PROJECT_ROOT
from backend.errors import DatabaseError
from backend.storage.engine import create_database_if_missing, create_engine_checked


def migrated_engine(server_url: str, name: str) -> sa.Engine:
    """An engine on database `name` of the server at `server_url`, created if missing and migrated to head."""
    url = make_url(server_url)
    create_database_if_missing(url, name)
    engine = create_engine_checked(url.set(database=name).render_as_string(hide_password=False))
    migrate(engine)
    return engine


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
