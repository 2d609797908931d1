"""Alembic environment: migrates the database backend.storage.engine resolves (embedded or configured)."""
from alembic import context

from backend.storage.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by backend.storage.migrations.migrate
        _run(connection)
        return
    from backend.storage.engine import get_engine

    with get_engine().connect() as connection:
        _run(connection)


def _run(connection) -> None:
    # A collection's schema keeps its own version table (backend.storage.migrations.migrate_schema sets its search path).
    schema = config.attributes.get("schema", "public")
    context.configure(connection=connection, target_metadata=target_metadata,
                      version_table_schema=None if schema == "public" else schema)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `python -m backend init-db`")
run_migrations_online()
