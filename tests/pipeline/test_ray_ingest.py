"""Ingestion on Ray (`populate --engine ray`) on a local Ray cluster started here: the same rows as the
single-process engine, and a run killed half-way and re-run ends with exactly the rows of an uninterrupted one."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.embedding.models import create_embedder
from backend.pipeline.datasets import load_dataset
from backend.pipeline.ingest import ingest
from backend.storage import collections
from backend.storage import images as image_store
from backend.storage.collections import CollectionSessions
from backend.storage.engine import create_engine_checked
from tests.helpers import ROOT, free_port, wait_listening, write_fashion_mnist, write_folder_dataset

# Not imported here: Ray reads its authentication settings when first imported, after the fixture sets them.
pytestmark = [pytest.mark.slow, pytest.mark.minutes, pytest.mark.xdist_group("ray"), pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                                   reason="Ray is installed by requirements-dev.txt")]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_address():
    """A Ray head with 2 CPUs on this machine, as `ray start --head` makes one, with token authentication (Ray's
    default) on a token of its own that this process and its children are given; stopped afterwards.

    Its own temporary folder and its own session, stopped by killing that session's processes: `ray stop` would
    stop every Ray cluster on the machine, and a process connected to one whose GCS goes away is ended by Ray
    (under two test workers, one worker's `ray stop` took the other one down)."""
    import secrets
    import shutil
    import tempfile

    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {key: os.environ.get(key) for key in auth}
    os.environ.update(auth)  # for ray.init here and for the populate processes the tests start
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_listening("127.0.0.1", port, 180, alive=lambda: head.poll() is None), head.stdout.read()
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started: nothing of theirs to keep
        head.wait(60)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sessions(url):
    return sessionmaker(create_engine_checked(url), expire_on_commit=False)


def _contents(url) -> dict:
    """Everything ingestion writes, keyed so that two databases can be compared: images by content hash with their
    category, name, label and size; vectors by hash; prototypes by category name with their member counts."""
    engine = create_engine_checked(url)
    with engine.connect() as conn:
        images = {r.sha256: (r.category, r.original_name, r.label, r.width, r.height, r.format) for r in conn.execute(
            sa.text("SELECT i.sha256, c.name AS category, i.original_name, i.label, i.width, i.height, i.format "
                    "FROM images i LEFT JOIN categories c ON c.id = i.category_id"))}
        vectors = {r[0]: np.asarray(r[1], np.float32) for r in conn.execute(
            sa.text("SELECT i.sha256, e.vector::real[] FROM embeddings e JOIN images i ON i.id = e.image_id"))}
        prototypes = {r[0]: (np.asarray(r[1], np.float32), r[2]) for r in conn.execute(
            sa.text("SELECT c.name, p.vector::real[], p.member_count FROM prototypes p JOIN categories c ON c.id = p.category_id"))}
    engine.dispose()
    return {"images": images, "vectors": vectors, "prototypes": prototypes}


def _assert_same(a: dict, b: dict, atol=1e-4) -> None:
    assert a["images"] == b["images"]
    assert a["vectors"].keys() == b["vectors"].keys()
    worst = max(float(np.abs(a["vectors"][k] - b["vectors"][k]).max()) for k in a["vectors"])
    assert worst < atol, f"vectors differ by up to {worst}"
    assert a["prototypes"].keys() == b["prototypes"].keys()
    for name, (vector, members) in a["prototypes"].items():
        assert members == b["prototypes"][name][1]
        assert np.allclose(vector, b["prototypes"][name][0], atol=atol)


def test_both_engines_store_the_same_images_vectors_and_prototypes(ray_address, db_url, other_db_url, tmp_path):
    from backend.pipeline.ray_ingest import connect, ingest_on_ray

    write_folder_dataset(tmp_path / "f", n_per_class=7)
    (tmp_path / "f" / "red" / "copy.png").write_bytes((tmp_path / "f" / "red" / "img000.png").read_bytes())
    (tmp_path / "f" / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = load_dataset("folder", "train", tmp_path / "f")
    embedder = create_embedder("efficientnet_lite0", device="cpu").load()
    single = ingest(_sessions(db_url), items, embedder, batch_size=4, progress=False)
    connect(ray_address)
    on_ray = ingest_on_ray(_sessions(other_db_url), items, embedder, other_db_url, batch_size=4, progress=False)
    assert (on_ray.added, on_ray.duplicates, len(on_ray.failed)) == (single.added, single.duplicates,
                                                                      len(single.failed)) == (21, 1, 1)
    assert on_ray.failed[0][0] == single.failed[0][0] and "broken.png" in on_ray.failed[0][0]
    _assert_same(_contents(db_url), _contents(other_db_url))
    again = ingest_on_ray(_sessions(other_db_url), items, embedder, other_db_url, batch_size=4, progress=False)
    assert (again.added, again.duplicates) == (0, 22)  # a re-run adds nothing twice
    _assert_same(_contents(db_url), _contents(other_db_url))
    # Into another collection of that database: its workers look up that collection, where nothing is stored yet.
    engine = create_engine_checked(other_db_url)
    collections.create_collection(engine, "again")
    registry = CollectionSessions(engine)
    elsewhere = ingest_on_ray(registry.sessions("again"), items, embedder, other_db_url, batch_size=4, progress=False)
    assert (elsewhere.added, elsewhere.duplicates) == (21, 1)
    with registry.sessions("again")() as s:
        assert image_store.counts(s)["embeddings"] == {"efficientnet_lite0": 21}
    engine.dispose()


def test_a_failing_ray_job_is_one_error_that_keeps_what_was_stored(ray_address, db_url, tmp_path):
    from sqlalchemy.engine import make_url

    from backend.pipeline.ray_ingest import RayUnavailable, connect, ingest_on_ray

    write_folder_dataset(tmp_path / "f", n_per_class=2)
    items = load_dataset("folder", "train", tmp_path / "f")
    unreachable = make_url(db_url).set(database="no_such_database").render_as_string(hide_password=False)
    connect(ray_address)
    with pytest.raises(RayUnavailable, match=r"the Ray job failed after 0 images .*no_such_database"):
        ingest_on_ray(_sessions(db_url), items, create_embedder("efficientnet_lite0", device="cpu"), unreachable,
                      batch_size=4, progress=False)


def _populate(env, data_dir, *args):
    return subprocess.Popen([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--data-dir",
                             str(data_dir), "--batch-size", "8", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _vectors_stored(url) -> int:
    engine = create_engine_checked(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar()
    engine.dispose()
    return n


def test_a_ray_run_killed_half_way_and_rerun_ends_with_the_rows_of_an_uninterrupted_run(
        ray_address, cli_env, other_db_url, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=12)  # 120 images, 15 batches of 8
    uninterrupted = _populate({**cli_env, "DATABASE_URL": other_db_url}, tmp_path / "fm")
    assert uninterrupted.wait(300) == 0, uninterrupted.stdout.read()
    ray_run = ["--engine", "ray", "--ray-address", ray_address]
    first = _populate(cli_env, tmp_path / "fm", *ray_run)
    deadline = time.monotonic() + 240
    while (stored := _vectors_stored(cli_env["DATABASE_URL"])) < 16 and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(60)
    stored = _vectors_stored(cli_env["DATABASE_URL"])
    assert 16 <= stored < 120, f"the kill came at {stored} of 120 stored vectors: not half-way"
    second = _populate(cli_env, tmp_path / "fm", *ray_run)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert f"added {120 - stored}," in output and f"{stored} already stored" in output, output
    _assert_same(_contents(other_db_url), _contents(cli_env["DATABASE_URL"]))


def test_an_unreachable_cluster_is_a_one_line_error_within_seconds(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=1)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--data-dir",
                           str(tmp_path / "fm"), "--engine", "ray", "--ray-address", f"127.0.0.1:{free_port()}"],
                          cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: cannot reach the Ray cluster at 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60
