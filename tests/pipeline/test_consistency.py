"""Consistency checks: PostgreSQL against itself and the index against PostgreSQL, on a real PostgreSQL; each
tampering gives its own finding. Also the `check` command, and the service under concurrent use."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.search.snapshot import read_footer
from backend.service.image_search import ImageSearch
from tests.helpers import CLASSES, PixelEmbedder, png_bytes, write_fashion_mnist, write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]
MODEL = PixelEmbedder.name


@pytest.fixture
def search(sessions, tmp_path):
    """24 images in 3 categories, indexed."""
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap", batch_size=8)
    search.build_database("folder", tmp_path / "f", progress=False)
    return search


def _sql(sessions, statement, **params):
    with sessions() as s, s.begin():
        return s.execute(sa.text(statement), params)


def _first(sessions, query, **params):
    with sessions() as s:
        return s.execute(sa.text(query), params).scalar()


def test_a_consistent_collection_checks_ok(search):
    report = search.check()
    assert report.ok, report.findings
    assert report.summary() == f"check: OK: 24 images, 24 {MODEL} vectors, 3 prototypes, index (live) matches"


def _prototype_vector_changed(search, sessions):
    _sql(sessions, "UPDATE prototypes SET vector = (SELECT vector FROM prototypes WHERE category_id = :b) "
                   "WHERE category_id = :a", a=1, b=2)
    return ["prototype of category 1: vector is off its members' normalised mean",
            "the index's prototype of category 1 differs from PostgreSQL's"]


def _member_count_changed(search, sessions):
    _sql(sessions, "UPDATE prototypes SET member_count = member_count + 1 WHERE category_id = 2")
    return ["prototype of category 2: member_count is 9, but it has 8 members"]


def _embedding_deleted(search, sessions):
    image = _first(sessions, "SELECT min(image_id) FROM embeddings")
    _sql(sessions, "DELETE FROM embeddings WHERE image_id = :i", i=image)  # the index is not told
    return [f"images in a category without a {MODEL} vector, so never found: 1 (ids {image})",
            f"images in the index without a {MODEL} vector and a category in PostgreSQL: 1 (ids {image})",
            "prototype of category 1: member_count is 8, but it has 7 members"]


def _removed_from_the_index(search, sessions):
    image = int(search.index.ids()[3])
    search.index.remove([image])
    return [f"images with {MODEL} vectors in PostgreSQL missing from the index: 1 (ids {image})",
            "vectors per category differ: category 1: 7 vectors in the index, 8 in PostgreSQL"]


def _vector_changed_in_the_index(search, sessions):
    category, ids, vectors = next(search.index.partitions())
    search.index.add(ids[:1], vectors[:1] + 1e-3, [category])  # replaced in the index only
    return [f"images whose vector in the index differs from PostgreSQL's: 1 (ids {ids[0]})"]


def _moved_to_another_category(search, sessions):
    image = _first(sessions, "SELECT min(id) FROM images WHERE category_id = 1")
    _sql(sessions, "UPDATE images SET category_id = 3 WHERE id = :i", i=image)
    return [f"images in another category in the index than in PostgreSQL: 1 (image {image}: category 1 in the "
            "index, 3 in PostgreSQL)",
            "prototype of category 3: member_count is 8, but it has 9 members",
            "vectors per category differ: category 1: 8 vectors in the index, 7 in PostgreSQL; "
            "category 3: 8 vectors in the index, 9 in PostgreSQL"]


def _image_row_deleted_around_the_foreign_keys(search, sessions):
    image = _first(sessions, "SELECT max(id) FROM images")
    _sql(sessions, "ALTER TABLE images DISABLE TRIGGER ALL")  # no cascade: as a careless restore might leave it
    _sql(sessions, "DELETE FROM images WHERE id = :i", i=image)
    return [f"{MODEL} vectors of no stored image: 1 (ids {image})"]


TAMPERING = [_prototype_vector_changed, _member_count_changed, _embedding_deleted, _removed_from_the_index,
             _vector_changed_in_the_index, _moved_to_another_category, _image_row_deleted_around_the_foreign_keys]


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__.strip("_"))
def test_each_tampering_gives_its_own_finding(search, sessions, tamper):
    assert _first(sessions, "SELECT string_agg(id || '=' || name, ',' ORDER BY id) FROM categories") == \
        ",".join(f"{i}={name}" for i, name in enumerate(sorted(CLASSES), 1))  # the ids the findings name
    expected = tamper(search, sessions)
    report = search.check()
    assert not report.ok and report.summary().startswith("check: ")
    for finding in expected:
        assert any(line.startswith(finding) for line in report.findings), (finding, report.findings)


def run(env, *args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_check_command(cli_env, db_url, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=2)
    populate = run(cli_env, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--num-images", "20",
                   "--data-dir", str(tmp_path / "fm"))
    assert populate.returncode == 0, populate.stderr
    counts = "20 images, 20 efficientnet_lite0 vectors, 10 prototypes"

    first = run(cli_env, "-m", "backend", "check")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "note: no snapshot at" in first.stdout and f"check: OK: {counts}, no index compared" in first.stdout

    assert run(cli_env, "-m", "backend", "rebuild").returncode == 0  # writes the snapshot
    ok = run(cli_env, "-m", "backend", "check")
    assert ok.returncode == 0 and f"check: OK: {counts}, index (snapshot) matches" in ok.stdout, ok.stdout

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE prototypes SET member_count = member_count + 1 WHERE category_id = "
                             "(SELECT min(category_id) FROM prototypes)"))
    engine.dispose()
    tampered = run(cli_env, "-m", "backend", "check")
    assert tampered.returncode == 1 and "member_count is 3, but it has 2 members" in tampered.stdout
    assert f"check: 1 problem: {counts}, index (snapshot)" in tampered.stdout and "to repair" in tampered.stdout

    assert run(cli_env, "-m", "backend", "rebuild").returncode == 0  # recomputes the prototypes
    snapshot = Path(cli_env["DATA_DIR"]) / "index" / "efficientnet_lite0-flatip.snapshot"
    data = bytearray(snapshot.read_bytes())
    _, offset, _, _ = read_footer(np.frombuffer(bytes(data), np.uint8))["prototypes"]
    data[offset:offset + 4] = np.float32(0.5).tobytes()  # a prototype changed under the old footer
    snapshot.write_bytes(bytes(data))
    damaged = run(cli_env, "-m", "backend", "check")
    assert damaged.returncode == 1 and f"the snapshot {snapshot} is corrupt (checksum mismatch)" in damaged.stdout
    assert sorted(p.name for p in snapshot.parent.iterdir() if p.suffix != ".writer") == [snapshot.name]  # not moved


@pytest.mark.slow
def test_concurrent_searches_adds_and_deletes_leave_everything_consistent(search):
    stop_at = time.monotonic() + 15
    errors, done = [], {"search": 0, "add": 0, "delete": 0}
    added, lock = [], threading.Lock()

    def worker(kind, seed):
        rng = np.random.default_rng(seed)
        try:
            while time.monotonic() < stop_at:
                if kind == "search":
                    query = Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 256, 3)))
                    search.search_similar(query, k=5, top_categories=int(rng.integers(1, 4)))
                elif kind == "add":
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # distinct bytes: never a duplicate
                    result = search.add_image(png_bytes(Image.fromarray(pixels)), str(rng.choice(CLASSES + ["new"])))
                    with lock:
                        added.append(result.image_id)
                else:
                    with lock:
                        victim = added.pop(int(rng.integers(len(added)))) if len(added) > 2 else None
                    if victim is None:
                        time.sleep(0.01)
                        continue
                    search.delete_image(victim)
                with lock:
                    done[kind] += 1
        except Exception as exc:  # noqa: BLE001 - any failure in any thread fails the test
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(kind, seed))
               for seed, kind in enumerate(["search", "search", "add", "add", "delete"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert min(done.values()) >= 10, done
    report = search.check()
    assert report.ok, report.findings
    assert search.refresh() == (0, 0)
    assert len(search.index) == 24 + done["add"] - done["delete"]
