"""Loaders read each dataset format from disk; selection is balanced; missing data fails fast and clearly."""
import collections
import socket
import time

import numpy as np
import pytest
from PIL import Image

from backend.embedding.decode import decode
from backend.errors import DatasetUnavailable
from backend.pipeline import datasets
from backend.pipeline.datasets import load_dataset, read_idx, select_balanced
from tests.helpers import CLASSES, write_cifar10_batches, write_fashion_mnist, write_folder_dataset, write_idx


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)


def test_fashion_mnist_from_idx_files(tmp_path):
    write_fashion_mnist(tmp_path, n_per_class=3)
    items = load_dataset("fashion-mnist", "train", tmp_path)
    assert len(items) == 30 and {it.category for it in items} == set(datasets.FASHION_MNIST_CLASSES)
    first = decode(items[0].read())
    assert (first.width, first.height, first.format) == (28, 28, "PNG")
    assert len(load_dataset("fashion-mnist", "test", tmp_path)) == 10


def test_cifar10_from_python_batches(tmp_path):
    write_cifar10_batches(tmp_path, n_per_batch=4)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert len(train) == 20 and len(test) == 4
    assert all(it.category in datasets.CIFAR10_CLASSES for it in train)
    assert decode(train[0].read()).image.size == (32, 32)


def test_cifar10_from_hub_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import png_bytes

    rows = [{"img": {"bytes": png_bytes(Image.new("RGB", (32, 32), (i, 0, 0))), "path": None}, "label": i % 10}
            for i in range(12)]
    (tmp_path / "plain_text").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "plain_text" / "train-00000-of-00001.parquet")
    items = load_dataset("cifar10", "train", tmp_path)
    assert [it.label for it in items] == [i % 10 for i in range(12)]
    assert decode(items[3].read()).image.getpixel((0, 0)) == (3, 0, 0)


def test_folder_and_csv(tmp_path):
    write_folder_dataset(tmp_path / "folder", n_per_class=4)
    items = load_dataset("folder", data_dir=tmp_path / "folder")
    assert collections.Counter(it.category for it in items) == {c: 4 for c in CLASSES}
    csv_path = tmp_path / "folder" / "data.csv"
    csv_path.write_text("file,product_name\n" + "".join(f"{it.original_name},{it.category}\n" for it in items))
    from_csv = load_dataset("csv", data_dir=csv_path)
    assert [(i.original_name, i.category) for i in from_csv] == [(i.original_name, i.category) for i in items]
    assert from_csv[0].read() == items[0].read()
    assert all(i.metadata is None for i in from_csv)


def test_csv_keeps_other_columns_as_metadata_numbers_as_numbers(tmp_path):
    write_folder_dataset(tmp_path / "folder", n_per_class=1)
    (tmp_path / "folder" / "data.csv").write_text(
        "file,category,year,price,colour,code,empty\n"
        "red/0.png,red,2001,9.5,dark red,007,\n"
        "green/0.png,green,-3,1e3,green,99999999999999999999,\n")
    first, second = load_dataset("csv", data_dir=tmp_path / "folder" / "data.csv")
    assert first.metadata == {"year": 2001, "price": 9.5, "colour": "dark red", "code": "007"}
    assert second.metadata == {"year": -3, "price": "1e3", "colour": "green", "code": "99999999999999999999"}


def test_csv_without_the_needed_columns_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("name,colour\na,b\n")
    with pytest.raises(DatasetUnavailable, match="needs a file column"):
        load_dataset("csv", data_dir=tmp_path / "x.csv")


def test_select_balanced_spreads_evenly_and_fills_from_larger_classes():
    items = [datasets.Item(c, None, f"{c}{i}", "t", None, bytes) for c, n in (("a", 10), ("b", 10), ("c", 2))
             for i in range(n)]
    assert collections.Counter(it.category for it in select_balanced(items, 6)) == {"a": 2, "b": 2, "c": 2}
    assert collections.Counter(it.category for it in select_balanced(items, 9)) == {"a": 4, "b": 3, "c": 2}
    assert collections.Counter(it.category for it in select_balanced(items, 12)) == {"a": 5, "b": 5, "c": 2}
    assert select_balanced(items, 12) == select_balanced(items, 12)
    assert len(select_balanced(items, None)) == 22


def test_cifar10_without_local_copy_or_network_fails_within_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr("backend.config.settings.data_dir", tmp_path)
    def unreachable(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    started = time.monotonic()
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("cifar10", "train", None)
    assert time.monotonic() - started < 5
    assert "--data-dir" in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    assert "hub" in str(err.value) and "network unreachable" in str(err.value)


def test_a_named_local_copy_that_is_missing_does_not_fall_back_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("must not try the network"))
    for name in ("cifar10", "fashion-mnist"):
        with pytest.raises(DatasetUnavailable, match="--data-dir"):
            load_dataset(name, "train", tmp_path)
