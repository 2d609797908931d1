"""The command line: `python -m backend COMMAND`, one command per pipeline stage."""
import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from backend.errors import ImsrcError



def cmd_init_db(args) -> int:
    """Create or upgrade the schema to the newest migration (safe to repeat)."""
    from backend.database import current_revision, get_engine, migrate

    engine = get_engine()
    migrate(engine)
    print(f"database schema at revision {current_revision(engine)}")
    return 0


def cmd_populate(args) -> int:
    """Load a dataset, embed its images with MODEL_NAME and store them."""
    from backend.config import settings
    from backend.database import session_factory
    from backend.datasets import load_dataset, select_balanced
    from backend.embedders import get_embedder
    from backend.ingest import ingest

    items = select_balanced(load_dataset(args.dataset, args.split, args.data_dir, args.image_dir), args.num_images)
    embedder = get_embedder().load()
    factory = session_factory()
    print(f"populating {len(items)} images from {args.dataset} ({args.split}) with {embedder.name} on {embedder.device}")
    report = ingest(factory, items, embedder, batch_size=args.batch_size or settings.batch_size)
    print(report.summary())
    return 0


def cmd_status(args) -> int:
    """Print what the database holds and which database and model are in use."""
    from sqlalchemy.engine import make_url

    from backend import store
    from backend.config import settings
    from backend.database import database_url, is_embedded, session_factory
    from backend.embedders import model_dim

    with session_factory()() as session:
        c = store.counts(session)
    where = f"embedded PostgreSQL in {settings.pg_data_dir}" if is_embedded() else \
        make_url(database_url()).render_as_string(hide_password=True)
    print(f"database:   {where}")
    print(f"model:      {settings.model_name} ({model_dim(settings.model_name)}-d)")
    print(f"images:     {c['images']}")
    print(f"categories: {c['categories']}")
    for model in sorted(set(c["embeddings"]) | set(c["prototypes"])):
        print(f"  {model} ({c['dims'].get(model, '?')}-d): {c['embeddings'].get(model, 0)} embeddings, "
              f"{c['prototypes'].get(model, 0)} prototypes")
    if not c["embeddings"]:
        print("no embeddings yet: run `python -m backend populate`")
    return 0


def cmd_rebuild(args) -> int:
    """Recompute the prototypes of MODEL_NAME from PostgreSQL, rebuild its index and snapshot it."""
    from backend.service import ImageSearch

    started = time.perf_counter()
    search = ImageSearch.open()
    if search.index_source == "snapshot":  # open() trusted the snapshot; a rebuild is what was asked for
        search.rebuild()
    index = search.index
    print(f"rebuilt {len(index.categories)} prototypes and the {index.index_type} index of {len(index)} "
          f"{search.embedder.name} vectors in {time.perf_counter() - started:.1f} s; "
          f"snapshot {search.manager.snapshot_path}")
    return 0


def cmd_evaluate(args) -> int:
    """Measure precision, mAP and recall of two-stage against exhaustive search, with latencies."""
    from backend import store
    from backend.datasets import load_dataset, select_balanced
    from backend.evaluate import evaluate, format_table, write_json
    from backend.service import ImageSearch

    search = ImageSearch.open()
    if args.dataset is None:
        with search.sessions() as s:
            args.dataset = store.main_source_dataset(s)
        if args.dataset not in ("cifar10", "fashion-mnist"):
            raise ImsrcError("cannot tell which dataset the collection came from: pass --dataset (and --data-dir)")
    queries = select_balanced(load_dataset(args.dataset, args.split, args.data_dir, args.image_dir), args.queries)
    report = evaluate(search, queries, k=args.k)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_serve(args) -> int:
    """Serve the REST API and the web page (model and index load once at start-up)."""
    import uvicorn

    from backend.config import settings

    host, port = args.host or settings.api_host, args.port or settings.api_port
    logging.getLogger("backend").setLevel(logging.INFO)  # start-up says how the index was loaded, and how fast
    print(f"imsrc: open http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}/app/ "
          f"(API docs at /docs)", flush=True)
    uvicorn.run("backend.main:app", host=host, port=port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    from backend.datasets import DATASETS

    parser = argparse.ArgumentParser(prog="python -m backend", description="imsrc: image similarity search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init-db", help=cmd_init_db.__doc__).set_defaults(func=cmd_init_db)

    p = sub.add_parser("populate", help=cmd_populate.__doc__)
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--num-images", type=_positive_int, default=None, help="take N images balanced across classes")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local copy of the dataset (a folder; for --dataset csv, the CSV file)")
    p.add_argument("--image-dir", type=Path, default=None, help="for --dataset csv: where relative file paths point")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default BATCH_SIZE)")
    p.set_defaults(func=cmd_populate)

    sub.add_parser("status", help=cmd_status.__doc__).set_defaults(func=cmd_status)
    sub.add_parser("rebuild", help=cmd_rebuild.__doc__).set_defaults(func=cmd_rebuild)

    p = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    p.add_argument("--queries", type=_positive_int, default=1000, help="held-out query images, balanced by class")
    p.add_argument("--k", type=_positive_int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="where queries come from (default: the collection's own dataset)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--image-dir", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--host", default=None, help="default API_HOST")
    p.add_argument("--port", type=_positive_int, default=None, help="default API_PORT")
    p.set_defaults(func=cmd_serve)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors a person can fix print one message and exit 2."""
    args = build_parser().parse_args(argv)
    # A plain SIGTERM would end the process without cleanup; as SystemExit, atexit stops the embedded server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ImsrcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: batches already stored are kept; run the same command again to resume", file=sys.stderr)
        return 130
