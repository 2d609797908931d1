"""Commands that run and describe the system: init-db, status, serve, calibrate."""
import os

from backend.cli.arguments import positive_int
from backend.errors import ImsrcError


def cmd_init_db(args) -> int:
    """Create or upgrade the schema to the newest migration (safe to repeat)."""
    from backend.storage.engine import get_engine
    from backend.storage.migrations import current_revision, migrate

    engine = get_engine()
    migrate(engine)
    print(f"database schema at revision {current_revision(engine)}")
    return 0


def cmd_status(args) -> int:
    """Print what the database holds and which database and model are in use."""
    if args.line:
        print(status_line())
        return 0
    from backend.service.model_choice import choose_model, unserved_notice
    from backend.storage import images as image_store
    from backend.storage.heads import model_dim
    from backend.storage.sessions import session_factory

    factory = session_factory()
    with factory() as session:
        c = image_store.counts(session)
        choice = choose_model(factory, quiet=True)
        dim = model_dim(session, choice.name)
    print(f"database:   {_database_description()}")
    print(f"model:      {choice.name} ({dim}-d): {choice.reason}")
    print(f"images:     {c['images']}")
    print(f"categories: {c['categories']}")
    for model in sorted(set(c["embeddings"]) | set(c["prototypes"])):
        print(f"  {model} ({c['dims'].get(model, '?')}-d): {c['embeddings'].get(model, 0)} embeddings, "
              f"{c['prototypes'].get(model, 0)} prototypes")
    if not c["embeddings"]:
        print("no embeddings yet: run `python -m backend populate`")
    elif notice := unserved_notice(c["embeddings"], choice.name):
        print(f"note: {notice}")
    return 0


def status_line() -> str:
    """One line for the set-up menu: database, images, model, index and writes, each with what to do next."""
    from backend.config import settings, writes_mode
    from backend.search.snapshot import read_meta, snapshot_path
    from backend.service.model_choice import choose_model
    from backend.storage import images as image_store
    from backend.storage.collections import snapshot_dir_of
    from backend.storage.fingerprints import fingerprint
    from backend.storage.sessions import session_factory

    writes = writes_mode(short=True)
    try:
        where = _database_description(short=True)
        factory = session_factory()
        with factory() as s:
            images = image_store.counts(s)["images"]
        choice = choose_model(factory, quiet=True)
        with factory() as s:
            current = fingerprint(s, choice.name)
    except ImsrcError as exc:
        return (f"database: not reachable ({str(exc).splitlines()[0]}): check DATABASE_URL, or unset it for the "
                f"embedded server | {writes}")
    meta = read_meta(snapshot_path(snapshot_dir_of(settings.snapshot_dir, settings.collection), choice.name,
                                       settings.faiss_index_type))
    if current.startswith("0:"):
        index = "no vectors yet: populate (3)"
    elif meta and meta.get("fingerprint") == current and meta.get("model") == choice.name:
        index = "index ready"
    else:
        index = "index not built: 4 builds it (or the server at start)"
    return (f"database: {where}, reachable | {images:,} images | model: {choice.name} ({choice.source}) | "
            f"{index} | {writes}")


def _database_description(short: bool = False) -> str:
    from sqlalchemy.engine import make_url

    from backend.config import settings
    from backend.storage.engine import database_url, is_embedded

    if is_embedded():
        return "embedded" if short else f"embedded PostgreSQL in {settings.pg_data_dir}"
    url = make_url(database_url())
    return f"external {url.host or 'socket'}:{url.port or 5432}/{url.database}" if short else \
        url.render_as_string(hide_password=True)


def cmd_serve(args) -> int:
    """Serve the REST API and the web page (model and index load once at start-up, in each worker)."""
    import copy
    import tempfile

    import uvicorn

    from backend.config import settings

    host, port = args.host or settings.api_host, args.port or settings.api_port
    # Start-up says how the index was loaded, and how fast; in a logging config, so that every worker says it too.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["backend"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # Every line says which request it belongs to (backend.api.telemetry), "-" outside one.
    log_config["filters"] = {"request_id": {"()": "backend.api.telemetry.RequestIdFilter"}}
    for handler in log_config["handlers"].values():
        handler["filters"] = ["request_id"]
    log_config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    log_config["formatters"]["access"]["fmt"] = \
        '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # The workers write their metrics here, and /metrics sums them, whichever worker answers.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imsrc-metrics-")
    _announce_when_ready(host, port)
    if args.workers > 1:
        print(f"imsrc: {args.workers} worker processes, each with its own model and index, kept in step through "
              f"PostgreSQL", flush=True)
    # Workers answer the supervisor's health pings from a thread; loading a model on a busy CPU can starve it for
    # more than uvicorn's 5 s, which would have the worker killed while it starts.
    uvicorn.run("backend.main:app", host=host, port=port, log_level="info", log_config=log_config,
                workers=args.workers, timeout_worker_healthcheck=60)
    return 0


def _announce_when_ready(host: str, port: int) -> None:
    """Print the page's address once the server answers /health (the model and index loaded), not before: a
    newcomer who opens it at once finds a page that works. From the supervising process, so once for any workers."""
    import threading
    import time
    import urllib.request

    anywhere = host in ("0.0.0.0", "::")  # every interface: this machine reaches it on loopback
    probe = f"http://{'127.0.0.1' if anywhere else host}:{port}/health"
    shown = f"http://{'localhost' if anywhere or host == '127.0.0.1' else host}:{port}/app/"

    def wait():
        while True:
            try:
                with urllib.request.urlopen(probe, timeout=2) as r:
                    if r.status == 200:
                        print(f"imsrc: ready: open {shown} (API docs at /docs)", flush=True)
                        return
            except OSError:  # not listening yet, or 503 while the model loads
                pass
            time.sleep(0.5)

    threading.Thread(target=wait, name="announce", daemon=True).start()


def cmd_calibrate(args) -> int:
    """Measure again which engine (precision, PyTorch or OpenVINO) runs the model fastest here, and store it: every
    process and restart on this machine uses it (it is measured once by itself otherwise)."""
    from backend.embedding.calibration import EngineChoices
    from backend.embedding.models import get_embedder
    from backend.embedding.projection import base_of
    from backend.service.model_choice import choose_model
    from backend.storage.sessions import session_factory

    name = base_of(args.model or choose_model(session_factory(), quiet=True).name)
    embedder = get_embedder(name)
    if embedder.precision_setting != "auto" and embedder.runtime != "auto":
        raise ImsrcError("EMBED_PRECISION and EMBED_RUNTIME are both set: there is nothing to measure")
    EngineChoices(embedder.engine_dir).forget(name)
    embedder.load()
    print(f"{name}: {embedder.runtime_in_use}, {embedder.precision} ({embedder.precision_reason}; "
          f"{embedder.runtime_reason}); stored in {embedder.engine_dir}")
    return 0


def register(sub) -> None:
    """Add this module's commands to the parser's subcommands."""
    sub.add_parser("init-db", help=cmd_init_db.__doc__).set_defaults(func=cmd_init_db)
    p = sub.add_parser("status", help=cmd_status.__doc__)
    p.add_argument("--line", action="store_true", help="one line, as the set-up menu shows it")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--host", default=None, help="default API_HOST")
    p.add_argument("--port", type=positive_int, default=None, help="default API_PORT")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="worker processes sharing the port (each holds the model and the index: see README)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("calibrate", help=cmd_calibrate.__doc__)
    p.add_argument("--model", default=None, help="default: the model in use")
    p.set_defaults(func=cmd_calibrate)
