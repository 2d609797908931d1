"""The command line: `python -m backend COMMAND`, one command per pipeline stage."""
import argparse
import logging
import sys
from pathlib import Path

from backend.errors import ImsrcError

log = logging.getLogger("backend")


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
    from backend.config import settings
    from backend.database import database_url, is_embedded, session_factory
    from backend.embedders import model_dim
    from backend import store

    with session_factory()() as session:
        c = store.counts(session)
    where = f"embedded PostgreSQL in {settings.pg_data_dir}" if is_embedded() else \
        __import__("sqlalchemy").engine.make_url(database_url()).render_as_string(hide_password=True)
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
    """Recompute every prototype of MODEL_NAME exactly from its members."""
    from backend.config import settings
    from backend.database import session_factory
    from backend import store

    with session_factory()() as session, session.begin():
        n = store.rebuild_prototypes(session, settings.model_name)
    print(f"rebuilt {n} prototypes for {settings.model_name}")
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
