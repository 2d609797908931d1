"""The seed's entry point: `python db/init_system.py --setup-db | --build-index | --all`."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.cli import main  # noqa: E402


def run(argv: list[str]) -> int:
    """Map the seed's flags onto `python -m backend` commands."""
    parser = argparse.ArgumentParser(description="Set up the imsrc database and search structures.")
    parser.add_argument("--setup-db", action="store_true", help="migrate the schema to the newest revision")
    parser.add_argument("--build-index", action="store_true", help="rebuild prototypes (and the search index)")
    parser.add_argument("--all", action="store_true", help="both of the above")
    args = parser.parse_args(argv)
    if not (args.setup_db or args.build_index or args.all):
        parser.error("choose --setup-db, --build-index or --all")
    steps = (["init-db"] if args.setup_db or args.all else []) + (["rebuild"] if args.build_index or args.all else [])
    for step in steps:
        code = main([step])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
