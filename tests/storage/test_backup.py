"""`backup FILE` and `restore FILE`: everything imsrc keeps, into an empty data folder, and the same answers after."""
import subprocess
import sys

import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import make_url

from backend.config import settings
from backend.service.image_search import ImageSearch
from backend.storage.backup import user_tables
from backend.storage.collections import CollectionSessions, create_collection
from backend.storage.embedded_server import EmbeddedPostgres
from backend.storage.engine import create_engine_checked
from tests.helpers import ROOT, PixelEmbedder, png_bytes, write_folder_dataset

pytestmark = pytest.mark.slow


def _run(env, *args):
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _rows(engine) -> dict[str, int]:
    """Every table of every schema imsrc made, with its row count and, for image bytes, their checksum."""
    with engine.connect() as conn:
        rows = {f"{s}.{t}": conn.scalar(sa.text(f'SELECT count(*) FROM "{s}"."{t}"')) for s, t in user_tables(conn)}
        rows["bytes"] = conn.scalar(sa.text("SELECT md5(string_agg(data, ''::bytea ORDER BY sha256)) "
                                            "FROM public.image_blobs"))
    return rows


def _fill(engine, tmp_path) -> list[ImageSearch]:
    write_folder_dataset(tmp_path / "f", n_per_class=4)
    registry = CollectionSessions(engine)
    default = ImageSearch(registry.sessions("default"), PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    default.build_database("folder", tmp_path / "f", progress=False)
    create_collection(engine, "shop")
    shop = ImageSearch(registry.sessions("shop"), PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    for n in range(5):
        shop.add_image(png_bytes(Image.new("RGB", (24, 24), (40 * n, 200, 90))), f"kind{n % 2}")
    shop.decide_duplicates([1, 2], "not_duplicates")
    return [default, shop]


def _answers(searches: list[ImageSearch]) -> list[list[tuple[int, float]]]:
    return [[(hit.image_id, round(hit.score, 6)) for hit in search.search_by_id(image_id, k=5).results]
            for search in searches for image_id in range(1, 6)]  # ten searches: five in each collection


def test_backup_restored_into_an_empty_data_folder_holds_the_same_and_answers_the_same(db_url, cli_env, tmp_path):
    source = create_engine_checked(db_url)
    before = _fill(source, tmp_path)
    expected_rows, expected_answers = _rows(source), _answers(before)
    backup = tmp_path / "imsrc.backup"
    done = _run(cli_env, "backup", str(backup))
    assert done.returncode == 0, done.stderr
    assert backup.stat().st_size > 0 and "backed up" in done.stdout

    fresh = tmp_path / "fresh"  # a new machine's data folder: its own embedded server, nothing in it yet
    server = EmbeddedPostgres(fresh / "postgres")
    url = make_url(server.acquire()).set(database=settings.db_name).render_as_string(hide_password=False)
    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"} | {"DATA_DIR": str(fresh)}
    try:
        done = _run(env, "restore", str(backup))
        assert done.returncode == 0, done.stderr
        again = _run(env, "restore", str(backup))  # never over a database that holds something
        assert again.returncode == 2 and "needs an empty database" in again.stderr
        assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
        restored = create_engine_checked(url)
        assert _rows(restored) == expected_rows
        registry = CollectionSessions(restored)
        after = [ImageSearch(registry.sessions(name), PixelEmbedder(), snapshot_dir=fresh / "snap")
                 for name in ("default", "shop")]
        for search in after:  # `check`'s comparison, on the index each rebuilt from the restored rows
            report = search.check()
            assert report.ok and report.vectors > 0, report.findings
        assert _answers(after) == expected_answers
        for search in after + before:
            search.close()
        restored.dispose()
    finally:
        server.release()
    source.dispose()


def test_backup_and_restore_refuse_what_they_cannot_use(cli_env, empty_db_url, tmp_path):
    folder = _run(cli_env, "backup", str(tmp_path))
    assert folder.returncode == 2 and "is a folder" in folder.stderr
    missing = _run(cli_env, "restore", str(tmp_path / "nothing.backup"))
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    (tmp_path / "junk.backup").write_bytes(b"not a dump")
    junk = _run({**cli_env, "DATABASE_URL": empty_db_url}, "restore", str(tmp_path / "junk.backup"))
    assert junk.returncode == 2 and "error: pg_restore failed" in junk.stderr and "Traceback" not in junk.stderr


def test_an_empty_database_stays_empty_to_restore_while_another_session_holds_a_temporary_table(empty_db_url):
    engine = create_engine_checked(empty_db_url)
    try:
        with engine.connect() as other, engine.connect() as conn:
            other.execute(sa.text("CREATE TEMP TABLE incoming_vectors (image_id bigint)"))
            other.commit()
            assert user_tables(conn) == []  # restore would refuse the empty database, and backup's count fail
    finally:
        engine.dispose()
