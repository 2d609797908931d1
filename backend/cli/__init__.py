"""The command line: `python -m backend COMMAND`, one command per pipeline stage."""
import argparse
import logging
import os
import signal
import sys

import sqlalchemy as sa

from backend.cli import backups, collections, index, ops, pipeline
from backend.cli.arguments import collection_name
from backend.cli.prompts import Unanswered
from backend.errors import ImsrcError
from backend.storage.engine import DISK_FULL, disk_full


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="python -m backend", description="imsrc: image similarity search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("-c", "--collection", type=collection_name, default=None,
                        help="the collection a command works on (default: COLLECTION, else `default`)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (ops, pipeline, index, collections, backups):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors a person can fix print one message and exit 2."""
    args = build_parser().parse_args(argv)
    if args.collection:  # for this command, and for a server's workers (they read the environment)
        from backend.config import settings

        settings.collection = os.environ["COLLECTION"] = args.collection
    # A plain SIGTERM would end the process without cleanup; as SystemExit, atexit stops the embedded server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Which model a command picked, and why, is said plainly.
    note = logging.StreamHandler(sys.stderr)
    note.setFormatter(logging.Formatter("%(message)s"))
    chooser = logging.getLogger("backend.service.model_choice")
    chooser.addHandler(note)
    chooser.setLevel(logging.INFO)
    chooser.propagate = False
    try:
        return args.func(args)
    except ImsrcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
        # The database went away, is out of connections or out of disk after the command connected: one line.
        if disk_full(exc):
            print(f"error: {DISK_FULL}", file=sys.stderr)
            return 2
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        print(f"error: lost PostgreSQL during the command ({reason[:300]}); run it again once the database answers",
              file=sys.stderr)
        return 2
    except Unanswered as exc:
        print(exc, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: batches already stored are kept; run the same command again to resume", file=sys.stderr)
        return 130
