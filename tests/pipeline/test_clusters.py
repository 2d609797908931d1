"""Categories for collections without labels: k-means clusters stored as automatic categories, kept in step."""
import json
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from PIL import Image

from backend.errors import ImsrcError
from backend.pipeline.recluster import default_k, recluster
from backend.service import lookups
from backend.service.image_search import ImageSearch
from backend.storage.tables import Category
from tests.helpers import CLASSES, ROOT, PixelEmbedder, class_images, png_bytes, write_fashion_mnist


@pytest.fixture
def flat(tmp_path):
    """A folder of red, green and blue images with no subfolders: no labels."""
    images, labels = class_images(12)
    for n, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(tmp_path / f"{CLASSES[label]}-{n:02d}.png")
    return tmp_path


def _open(sessions, folder):
    return ImageSearch(sessions, PixelEmbedder(), snapshot_dir=folder / "snap", batch_size=8)


def _clusters(sessions) -> dict[str, set[str]]:
    """Automatic category name -> the colours of its images (from their file names)."""
    with sessions() as s:
        rows = s.execute(sa.text("SELECT c.name, i.original_name FROM images i JOIN categories c "
                                 "ON c.id = i.category_id WHERE c.automatic")).all()
    found: dict[str, set[str]] = {}
    for name, file in rows:
        found.setdefault(name, set()).add(file.split("-")[0])
    return found


def test_a_collection_without_labels_is_clustered_into_categories_that_search_uses(sessions, flat):
    search = _open(sessions, flat)
    search.build_database("folder", flat, progress=False)
    # without labels, the one populate (backend.pipeline.populate) groups them into automatic categories at once
    assert len(search.index) == 36 and len(search.index.categories) == default_k(36)
    assert search.recluster(3) == 3
    assert sorted(_clusters(sessions).values(), key=sorted) == [{"blue"}, {"green"}, {"red"}]  # pure
    assert len(search.index) == 36 and len(search.index.categories) == 3
    red = png_bytes(Image.fromarray(class_images(1, seed=7)[0][0]))
    hits = search.search_similar(red, k=5, top_categories=1).results
    assert {h.file_name.split("-")[0] for h in hits} == {"red"} and hits[0].category.startswith("cluster ")
    assert search.check().ok
    calibrated = search.no_match_threshold()
    assert calibrated is not None and search.recluster(3) == 3
    assert search.confidence.pending  # the members moved: the threshold is drawn again at the next search


def test_reclustering_moves_images_and_a_listening_server_follows(sessions, flat, tmp_path):
    writer = _open(sessions, flat)
    writer.build_database("folder", flat, progress=False)
    with sessions() as s, s.begin():
        recluster(s, "test-pixels", 3)
    manual = writer.add_image(png_bytes(Image.new("RGB", (32, 32), (200, 200, 0))), "yellow")  # a person's label
    server = _open(sessions, tmp_path / "server")
    server.start_live_sync()
    try:
        with sessions() as s, s.begin():
            assert recluster(s, "test-pixels", 2) == 2
        with sessions() as s:
            names = set(s.scalars(sa.select(Category.name).where(Category.automatic)))
            yellow = s.scalar(sa.select(Category.automatic).where(Category.name == "yellow"))
        assert names == {"cluster 1", "cluster 2"} and yellow is False  # the unused cluster is gone
        deadline = time.monotonic() + 2
        while not (server.check().ok and len(server.index.categories) == 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.check().ok and len(server.index.categories) == 3  # 2 clusters and "yellow"
        assert server.index.assignments()[manual.image_id] == lookups.category_id(writer.sessions, "yellow")
    finally:
        server.close()


def test_clustering_says_why_it_cannot(sessions, tmp_path):
    with sessions() as s, pytest.raises(ImsrcError, match="nothing to cluster"):
        recluster(s, "test-pixels", 3)
    assert default_k(10_000) == 20 and default_k(10) == 2 and default_k(10**8) == 256


@pytest.mark.slow
def test_populate_auto_categories_and_evaluate_by_label(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=8)
    run = lambda *a: subprocess.run([sys.executable, "-m", "backend", *a], cwd=ROOT, env=cli_env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    bad = run("populate", "--dataset", "fashion-mnist", "--categories", "auto:1")
    assert bad.returncode == 2 and "auto:K with K at least 2" in bad.stderr
    done = run("populate", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--categories", "auto:6")
    assert done.returncode == 0, done.stderr
    assert "into 6 automatic categories" in done.stdout
    again = run("recluster", "--k", "4")
    assert again.returncode == 0 and "into 4 automatic categories" in again.stdout, again.stderr
    out = run("evaluate", "--queries", "20", "--k", "3", "--data-dir", str(tmp_path / "fm"), "--json",
              str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "relevance by label (the categories are automatic clusters)" in out.stdout and "| P=3 |" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["configurations"]["exhaustive"]["precision@3"] > 0.3  # judged by label: far above chance (0.1)
