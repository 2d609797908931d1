"""Dataset loaders: each returns a list of lazily-read items (bytes + category), balanced selection on top."""
import csv
import gzip
import io
import logging
import pickle
import struct
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import numpy as np

from backend.embedding.decode import encode_png
from backend.errors import DatasetUnavailable
from backend.network import unreachable
from backend.storage.filters import key_problem, parse_number

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
HUB_HOST = "huggingface.co"
HUB_IDS = {"cifar10": "uoft-cs/cifar10", "fashion-mnist": "zalando-datasets/fashion_mnist"}


@dataclass(frozen=True)
class Item:
    """One image of a dataset, read only when needed."""

    category: str | None  # None: no label (populate clusters such images into automatic categories)
    label: int | None
    original_name: str
    source: str
    split: str | None
    read: Callable[[], bytes] = field(repr=False, compare=False)
    metadata: dict | None = field(default=None, compare=False)


def select_balanced(items: list[Item], n: int | None) -> list[Item]:
    """Up to n items, as even across categories as they allow, interleaved by category (deterministic)."""
    if n is None or n >= len(items):
        return list(items)
    by_category: dict[str, list[Item]] = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    interleaved = (it for row in zip_longest(*by_category.values()) for it in row if it is not None)
    return [it for _, it in zip(range(n), interleaved)]


# -- array datasets ---------------------------------------------------------------------------------
def _array_items(images: np.ndarray, labels: np.ndarray, classes: list[str], source: str, split: str) -> list[Item]:
    return [Item(category=classes[int(label)], label=int(label), original_name=f"{source}-{split}-{i:05d}.png",
                 source=source, split=split, read=lambda a=images[i]: encode_png(a))
            for i, label in enumerate(labels)]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format MNIST and Fashion-MNIST ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    return next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)


def _fashion_mnist_files(directory: Path, split: str) -> tuple[Path | None, Path | None]:
    prefix = "train" if split == "train" else "t10k"
    return _find(directory, f"{prefix}-images-idx3-ubyte"), _find(directory, f"{prefix}-labels-idx1-ubyte")


def fashion_mnist_arrays(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,)) of a Fashion-MNIST split from local IDX files (Debian's
    dataset-fashion-mnist); DatasetUnavailable, saying how to get them, when there are none."""
    directory = _fashion_mnist_dir(data_dir)
    images_path, labels_path = _fashion_mnist_files(directory, split)
    if not (images_path and labels_path):
        raise DatasetUnavailable(_fashion_mnist_hint(directory, split))
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise DatasetUnavailable(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    return images, labels


def load_fashion_mnist(split: str, data_dir: Path | None) -> list[Item]:
    """Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist), else the hub."""
    directory = _fashion_mnist_dir(data_dir)
    # A local copy that was named is never replaced by the hub behind the user's back
    if data_dir is None and not all(_fashion_mnist_files(directory, split)):
        return _hub_items("fashion-mnist", split, "image", FASHION_MNIST_CLASSES,
                          _fashion_mnist_hint(directory, split))
    images, labels = fashion_mnist_arrays(split, data_dir)
    return _array_items(images, labels, FASHION_MNIST_CLASSES, "fashion-mnist", split)


def _fashion_mnist_dir(data_dir: Path | None) -> Path:
    from backend.config import settings

    return Path(data_dir or settings.fashion_mnist_dir)


def _fashion_mnist_hint(directory: Path, split: str) -> str:
    prefix = "train" if split == "train" else "t10k"
    return (f"no Fashion-MNIST IDX files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) in "
            f"{directory}. Install them with `apt-get install dataset-fashion-mnist` (they land in "
            f"/usr/share/datasets/fashion-mnist), or pass --data-dir / set FASHION_MNIST_DIR")


def load_cifar10(split: str, data_dir: Path | None) -> list[Item]:
    """CIFAR-10 from a local copy (the python batches or the hub's parquet files), else the hub."""

    directory = Path(data_dir or _cifar10_dir())
    batches = _cifar_python_batches(directory, split)
    if batches:
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([b[b"labels"] for b in batches])
        return _array_items(images, labels, CIFAR10_CLASSES, "cifar10", split)
    parquet = _cifar_parquet_files(directory, split)
    if parquet:
        return _cifar_parquet_items(parquet, split)
    hint = (f"no local CIFAR-10 in {directory} (looked for cifar-10-batches-py/ or {split}-*.parquet). "
            "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and "
            "pass --data-dir PATH (or set CIFAR10_DIR); or use --dataset fashion-mnist, which works offline")
    if data_dir is not None:
        raise DatasetUnavailable(hint)
    return _hub_items("cifar10", split, "img", CIFAR10_CLASSES, hint)


def _cifar10_dir() -> Path:
    from backend.config import settings

    return Path(settings.cifar10_dir or settings.data_dir / "cifar10")


def _cifar_batch_files(directory: Path, split: str) -> list[Path]:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    for root in (directory / "cifar-10-batches-py", directory):
        if all((root / n).is_file() for n in names):
            return [root / n for n in names]
    return []


def _cifar_python_batches(directory: Path, split: str) -> list[dict]:
    batches = []
    for path in _cifar_batch_files(directory, split):
        with open(path, "rb") as f:
            batches.append(pickle.load(f, encoding="bytes"))
    return batches


def _cifar_parquet_files(directory: Path, split: str) -> list[Path]:
    return sorted(p for p in directory.rglob("*.parquet") if p.name.startswith(split)) if directory.is_dir() else []


def _cifar_parquet_items(files: list[Path], split: str) -> list[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f, columns=["img", "label"]) for f in files])
    images, labels = table.column("img").to_pylist(), table.column("label").to_pylist()
    return [Item(category=CIFAR10_CLASSES[label], label=label, original_name=img.get("path") or f"cifar10-{split}-{i:05d}.png",
                 source="cifar10", split=split, read=lambda b=img["bytes"]: b)
            for i, (img, label) in enumerate(zip(images, labels))]


def _hub_items(name: str, split: str, image_column: str, classes: list[str], local_hint: str) -> list[Item]:
    """The dataset from the Hugging Face hub, failing within seconds when the hub cannot be reached."""
    if (exc := unreachable(HUB_HOST)) is not None:
        raise DatasetUnavailable(f"{local_hint}; and the Hugging Face hub ({HUB_HOST}) cannot be reached: {exc}")
    import datasets

    log.info("loading %s/%s from the hub", HUB_IDS[name], split)
    ds = datasets.load_dataset(HUB_IDS[name], split=split)

    def read(i: int) -> bytes:
        buf = io.BytesIO()
        ds[i][image_column].save(buf, format="PNG")
        return buf.getvalue()

    return [Item(category=classes[label], label=label, original_name=f"{name}-{split}-{i:05d}.png",
                 source=name, split=split, read=lambda i=i: read(i))
            for i, label in enumerate(ds["label"])]


# -- file datasets ----------------------------------------------------------------------------------
def load_folder(root: Path) -> list[Item]:
    """One subfolder per category, holding jpg/png/webp/gif/bmp files; a folder of images with no subfolders gives
    items without a category (populate clusters them: --categories auto)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailable(f"--data-dir {root} is not a folder (expected one subfolder per category)")
    is_image = lambda f: f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES  # noqa: E731
    categories = sorted(p for p in root.iterdir() if p.is_dir())
    items = [Item(category=cat.name, label=label, original_name=str(f.relative_to(root)), source="folder",
                  split=None, read=f.read_bytes)
             for label, cat in enumerate(categories) for f in sorted(cat.rglob("*")) if is_image(f)]
    if not items:  # a flat folder: images without labels
        items = [Item(category=None, label=None, original_name=f.name, source="folder", split=None, read=f.read_bytes)
                 for f in sorted(root.iterdir()) if is_image(f)]
    if not items:
        raise DatasetUnavailable(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root} or its subfolders")
    return items


FILE_COLUMNS = ("file", "filename", "path", "image")
CATEGORY_COLUMNS = ("category", "product_name", "label")


def load_csv(csv_path: Path, image_dir: Path | None = None) -> list[Item]:
    """A CSV with a file column and a category (or product_name) column; paths relative to image_dir. Every other
    column becomes metadata of its images (numbers as numbers), which searches can filter on."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetUnavailable(f"--data-dir {csv_path} is not a CSV file")
    image_dir = Path(image_dir) if image_dir else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        file_col = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
        cat_col = next((columns[c] for c in CATEGORY_COLUMNS if c in columns), None)
        if not file_col or not cat_col:
            raise DatasetUnavailable(f"{csv_path} needs a file column ({'/'.join(FILE_COLUMNS)}) and a category "
                                     f"column ({'/'.join(CATEGORY_COLUMNS)}); it has {', '.join(columns) or 'none'}")
        extra = [c for c in reader.fieldnames or [] if c not in (file_col, cat_col) and c and c.strip()]
        problem = next((p for p in (key_problem(c.strip()) for c in extra) if p is not None), None)
        if problem is not None:
            raise DatasetUnavailable(f"{csv_path}: its columns become metadata keys, and {problem}")
        rows = [(r[file_col].strip(), r[cat_col].strip(), {c.strip(): _csv_value(r[c]) for c in extra
                                                           if (r.get(c) or "").strip()})
                for r in reader if (r.get(file_col) or "").strip()]
    labels = {name: i for i, name in enumerate(sorted({cat for _, cat, _ in rows if cat}))}
    return [Item(category=cat, label=labels[cat], original_name=file, source="csv", split=None,
                 read=(image_dir / file).read_bytes, metadata=meta or None)
            for file, cat, meta in rows if cat]


def _csv_value(text: str) -> int | float | str:
    """A CSV cell as metadata: a number when it reads as one in plain decimal (so that ranges filter it), else the
    text (backend.storage.filters.parse_number: `007` and `1E3` stay text)."""
    text = text.strip()
    number = parse_number(text)
    return number if number is not None else text


DATASETS = ("cifar10", "fashion-mnist", "folder", "csv")
DATASET_TITLES = {"cifar10": "CIFAR-10", "fashion-mnist": "Fashion-MNIST",
                  "folder": "a folder of images, one subfolder per category",
                  "csv": "a CSV file with a file column and a category column"}


def availability(name: str, split: str = "train") -> tuple[bool, str]:
    """Whether a downloadable dataset (cifar10, fashion-mnist) can be had here, and from where or why not."""
    from backend.config import settings

    directory = _cifar10_dir() if name == "cifar10" else Path(settings.fashion_mnist_dir)
    local = (_cifar_batch_files(directory, split) or _cifar_parquet_files(directory, split)) if name == "cifar10" \
        else all(_fashion_mnist_files(directory, split))
    if local:
        return True, f"local copy in {directory}"
    if (error := unreachable(HUB_HOST)) is None:
        return True, f"no local copy in {directory}; downloads from the Hugging Face hub ({HUB_HOST})"
    return False, f"no local copy in {directory}, and {HUB_HOST} cannot be reached ({error})"


def default_dataset(cifar10: tuple[bool, str] | None = None) -> tuple[str, str]:
    """CIFAR-10 when it can be had here (`cifar10`: its availability, if known), else Fashion-MNIST;
    returns (name, why, for a person)."""
    ok, where = cifar10 or availability("cifar10")
    if ok:
        return "cifar10", f"CIFAR-10: {where}"
    return "fashion-mnist", f"CIFAR-10 is not available here ({where}), so the default is Fashion-MNIST"


def load_dataset(name: str, split: str = "train", data_dir: Path | None = None, image_dir: Path | None = None) -> list[Item]:
    """The items of a named dataset (see DATASETS)."""
    if name == "cifar10":
        return load_cifar10(split, data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if data_dir is None:
        raise DatasetUnavailable(f"--dataset {name} needs --data-dir")
    if name == "folder":
        return load_folder(data_dir)
    if name == "csv":
        return load_csv(data_dir, image_dir)
    raise DatasetUnavailable(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
