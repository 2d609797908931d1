"""Commands that back up and restore everything imsrc keeps in PostgreSQL: backup, restore."""
import time
from pathlib import Path


def cmd_backup(args) -> int:
    """Write every collection, the image bytes, heads, history and decisions to one file (pg_dump)."""
    from backend.storage.backup import backup
    from backend.storage.engine import database_url

    started = time.perf_counter()
    size = backup(database_url(), args.file)
    print(f"backed up the database to {args.file} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s; "
          f"python -m backend restore {args.file} puts it into an empty database")
    return 0


def cmd_restore(args) -> int:
    """Restore a backup into an empty database (a new DATA_DIR, or a new DATABASE_URL) and migrate it to head."""
    from backend.storage.backup import restore
    from backend.storage.engine import get_engine
    from backend.storage.migrations import current_revision, migrate

    started = time.perf_counter()
    engine = get_engine()
    restore(engine, args.file)
    migrate(engine)  # a backup from an older imsrc is brought up to this one's schema
    print(f"restored {args.file} in {time.perf_counter() - started:.1f} s (schema at revision "
          f"{current_revision(engine)}); the first start or `rebuild` rebuilds the index snapshots")
    return 0


def register(sub) -> None:
    """Add this module's commands to the parser's subcommands."""
    p = sub.add_parser("backup", help=cmd_backup.__doc__)
    p.add_argument("file", type=Path, help="the file to write (replaced whole once the dump is complete)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help=cmd_restore.__doc__)
    p.add_argument("file", type=Path, help="a file `backup` wrote")
    p.set_defaults(func=cmd_restore)
