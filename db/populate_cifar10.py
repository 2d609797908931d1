"""The seed's entry point: `python db/populate_cifar10.py --num-images N` (= python -m backend populate --dataset cifar10)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["populate", "--dataset", "cifar10", *sys.argv[1:]]))
