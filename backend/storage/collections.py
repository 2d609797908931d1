"""Collections: named sets of images, each with its own model, categories, prototypes and index.

A collection's tables live in a PostgreSQL schema of its own (`c_<name>`; the default collection's in `public`), and
every connection of a collection has that schema first on its search path: the same queries serve every collection,
and one collection's queries cannot see another's rows. Shared by all, in `public`: this registry
(public.collections) and the image bytes (public.image_blobs), stored once however many collections hold an image.
"""
import logging
import re
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.errors import Conflict, InvalidQuery, NotFound
from backend.storage.tables import Collection

log = logging.getLogger(__name__)

DEFAULT = "default"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # also a valid, unquoted part of a schema name


class CollectionExists(Conflict):
    """A collection of that name exists already."""


@dataclass(frozen=True)
class CollectionInfo:
    """A registered collection."""

    name: str
    schema: str
    model_name: str | None
    description: str | None
    created_at: datetime


def check_name(name: str) -> str:
    """The name, if it can name a collection; else InvalidQuery saying what a name may be."""
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidQuery(f"a collection's name is 1 to 40 lowercase letters, digits and underscores, starting with "
                           f"a letter, not {str(name)[:50]!r}")
    return name


def schema_of(name: str) -> str:
    """The PostgreSQL schema a collection's tables live in."""
    return "public" if name == DEFAULT else f"c_{check_name(name)}"


def snapshot_dir_of(base: Path, name: str) -> Path:
    """Where a collection's index snapshots are kept under SNAPSHOT_DIR `base` (two collections may use one model)."""
    return Path(base) if name == DEFAULT else Path(base) / "collections" / name


def _info(row: Collection) -> CollectionInfo:
    return CollectionInfo(row.name, row.schema, row.model_name, row.description, row.created_at)


def list_collections(engine: sa.Engine) -> list[CollectionInfo]:
    """Every collection, the default first, then by name."""
    with Session(engine) as s:
        rows = s.scalars(sa.select(Collection).order_by(Collection.name != DEFAULT, Collection.name)).all()
    return [_info(r) for r in rows]


def get_collection(engine: sa.Engine, name: str) -> CollectionInfo:
    """A collection by name; NotFound (404) when there is none."""
    check_name(name)
    with Session(engine) as s:
        row = s.get(Collection, name)
    if row is None:
        raise NotFound(f"collection {name!r} not found (python -m backend collections list)")
    return _info(row)


def create_collection(engine: sa.Engine, name: str, model_name: str | None = None,
                      description: str | None = None) -> CollectionInfo:
    """Register a collection and create its schema, migrated to head; `model_name` is the model it will use
    (None: chosen as backend.service.model_choice says when it is first populated)."""
    from backend.embedding.models import MODELS
    from backend.storage.migrations import migrate_in

    schema = schema_of(name)
    if model_name is not None and model_name not in MODELS:
        raise InvalidQuery(f"unknown model {model_name[:64]!r}: one of {', '.join(MODELS)}")
    if description is not None and len(description) > 500:
        raise InvalidQuery("a collection's description is at most 500 characters")
    # One transaction: nobody sees the collection before its tables (its search path would fall through to public's).
    with engine.begin() as conn:
        # Under a lock, so that two creations of one name cannot both pass the check.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('imsrc-collections'))"))
        if conn.scalar(sa.select(Collection.name).where(Collection.name == name)) is not None:
            raise CollectionExists(f"collection {name!r} exists already")
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        migrate_in(conn, schema)
        conn.execute(sa.insert(Collection).values(name=name, schema=schema, model_name=model_name,
                                                  description=description))
    log.info("created collection %s (schema %s)", name, schema)
    return get_collection(engine, name)


def delete_collection(engine: sa.Engine, name: str, snapshot_base: Path | None = None) -> None:
    """Delete a collection: its images, vectors, categories, prototypes, history and decisions, the bytes of images
    no other collection holds too, and its index snapshots under `snapshot_base`; serving processes unload it. The
    default collection cannot be deleted."""
    if name == DEFAULT:
        raise InvalidQuery("the default collection cannot be deleted (delete its images instead)")
    info = get_collection(engine, name)
    _drop(engine, name, info.schema)
    if snapshot_base is not None:
        shutil.rmtree(snapshot_dir_of(snapshot_base, name), ignore_errors=True)
    log.info("deleted collection %s", name)


def _drop(engine: sa.Engine, name: str, schema: str) -> None:
    from backend.storage.images import remove_unreferenced_blobs
    from backend.storage.notify import announce

    with Session(engine) as s, s.begin():
        s.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('imsrc-collections'))"))
        s.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        s.execute(sa.delete(Collection).where(Collection.name == name))
        announce(s, None, what="dropped", schema=schema)
    try:
        with Session(engine) as s, s.begin():
            remove_unreferenced_blobs(s)
    except sa.exc.SQLAlchemyError as exc:  # the collection is gone either way; the bytes go at a later deletion
        log.warning("collection %s deleted; its images' bytes are left for a later deletion: %s", name,
                    str(exc).splitlines()[0])


def set_model(session: Session, model_name: str | None) -> None:
    """Record the model the session's collection uses (its search path says which collection that is)."""
    session.execute(sa.update(Collection).where(Collection.schema == sa.func.current_schema())
                    .values(model_name=model_name))


def recorded_model(session: Session) -> str | None:
    """The model recorded for the session's collection, if one was."""
    return session.scalar(sa.select(Collection.model_name).where(Collection.schema == sa.func.current_schema()))


class CollectionSessions:
    """Session factories per collection on one database, all on one engine (one pool for the process however many
    collections it serves): each session's transactions put the collection's schema first on their search path."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self._made: dict[str, sessionmaker] = {}
        self._lock = threading.Lock()  # one look-up per collection, however many requests ask at once

    def sessions(self, name: str) -> sessionmaker:
        """Sessions of a registered collection; NotFound (404) for another name."""
        with self._lock:
            made = self._made.get(name)
            if made is None:
                made = self._made[name] = sessions_in(self.engine, get_collection(self.engine, name).schema)
            return made

    def forget(self, name: str) -> None:
        """Stop handing out sessions of a collection (deleted, or not served any more); the pool is shared."""
        with self._lock:
            self._made.pop(name, None)


def sessions_in(engine: sa.Engine, schema: str) -> sessionmaker:
    """Sessions on `engine` whose every transaction looks up tables in `schema` first, then in `public`.

    SET LOCAL lasts one transaction, so a pooled connection goes back as it came and any collection may use it next.
    Once a collection's schema is dropped its search path would fall through to `public` (the default collection's
    tables), so its transactions refuse to run instead."""
    made = sessionmaker(engine, expire_on_commit=False)
    if schema == "public":  # the server's default: no transaction needs telling
        return made

    @sa.event.listens_for(made, "after_begin")
    def on_schema(session, transaction, connection):
        # One round trip on every transaction: both drivers run a parameterless multi-statement query whole.
        found = connection.execute(sa.text(f'SET LOCAL search_path TO "{schema}", public; SELECT current_schema()'))
        if found.scalar() != schema:
            raise NotFound(f"collection schema {schema} is gone (the collection was deleted)")

    return made
