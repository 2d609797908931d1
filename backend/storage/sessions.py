"""The process-wide session factories, one per collection."""
import functools

from sqlalchemy.orm import sessionmaker

from backend.config import settings
from backend.storage.engine import embedded_server, get_engine, is_embedded
from backend.storage.migrations import migrate


@functools.cache
def collection_sessions():
    """The process-wide backend.storage.collections.CollectionSessions (the engine migrated to head on first use)."""
    from backend.storage.collections import CollectionSessions

    engine = get_engine()
    migrate(engine)
    return CollectionSessions(engine)


def session_factory(collection: str | None = None) -> sessionmaker:
    """Sessions on the process-wide engine for a collection (default: COLLECTION's, which is `default` unless set)."""
    return collection_sessions().sessions(collection or settings.collection)


@functools.cache
def supervisor():
    """The process's backend.storage.supervision.Supervisor of the embedded server (started on first call)."""
    from backend.storage.supervision import Supervisor

    return Supervisor(embedded_server()).start()


def supervise() -> None:
    """Keep the embedded server running while this process serves; nothing to do on a configured database."""
    if is_embedded():
        supervisor()


def close() -> None:
    """Stop supervising, dispose the engines and let go of the embedded server (stopped if no other process uses
    it)."""
    if supervisor.cache_info().currsize:
        supervisor().stop()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    if embedded_server.cache_info().currsize:
        embedded_server().release()
    for cached in (supervisor, collection_sessions, get_engine, embedded_server):
        cached.cache_clear()
