"""Evaluation metrics on hand-checkable cases, and the evaluate command end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.pipeline.datasets import load_dataset
from backend.pipeline.evaluate import (average_precision_at_k, configurations, evaluate, format_table, overlap,
                                       query_metrics)
from backend.service.image_search import ImageSearch
from tests.helpers import PixelEmbedder, write_fashion_mnist, write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_on_a_toy_ranking():
    # labels of the top 4 results for a query of label 1; 3 relevant items exist in the collection
    m = query_metrics([1, 0, 1, 0], query_label=1, k=4, n_relevant=3)
    assert m["precision"] == 0.5
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["ap"] == pytest.approx((1 / 1 + 2 / 3) / 3)  # hits at ranks 1 and 3, over min(k, 3)
    assert average_precision_at_k(np.array([True, True]), 2, 10) == 1.0
    assert average_precision_at_k(np.array([False, False]), 2, 10) == 0.0
    assert overlap([1, 2, 3], [3, 4, 5]) == pytest.approx(1 / 3)
    assert [c.name for c in configurations((1, 2, 3, 5), 4)] == ["exhaustive", "P=1", "P=2", "P=3", "P=all"]


def test_evaluate_two_stage_against_exhaustive(sessions, tmp_path):
    write_folder_dataset(tmp_path / "index", n_per_class=10)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    search.build_database("folder", tmp_path / "index", progress=False)
    write_folder_dataset(tmp_path / "queries", n_per_class=4, seed=1)
    stored = load_dataset("folder", data_dir=tmp_path / "index")[:3]
    queries = load_dataset("folder", data_dir=tmp_path / "queries") + stored
    report = evaluate(search, queries, k=5, progress=False)
    assert report["queries"] == 12 and report["skipped_queries"] == 3  # images in the index are not queries
    configs = report["configurations"]
    assert list(configs) == ["exhaustive", "P=1", "P=2", "P=all"]
    assert configs["exhaustive"]["recall_vs_exhaustive@5"] == 1.0
    assert configs["P=all"]["recall_vs_exhaustive@5"] == 1.0  # all categories, exact index: the same hits
    assert configs["P=1"]["precision@5"] == 1.0  # colour classes: the right prototype, then only that class
    assert configs["P=1"]["recall@5"] == pytest.approx(0.5)  # 5 of the 10 relevant
    assert report["index_memory_mb"] > 0 and report["embedding_ms"]["p95"] >= report["embedding_ms"]["p50"]
    assert "| P=1 | 1.0000 |" in format_table(report)
    assert report["samples"] == []  # none asked for
    assert configs["P=1"]["precision@5_by_category"] == {"blue": 1.0, "green": 1.0, "red": 1.0}
    assert report["confidence"]["false_alarm_rate"] == 0.0  # held-out images drawn like the collection's
    # A perfect stage 1 keeps every exhaustive hit its P categories hold: never less than what the real one kept.
    ceiling = {p: configs[p]["best_possible_recall_vs_exhaustive@5"] for p in ("P=1", "P=2")}
    assert ceiling["P=1"] >= configs["P=1"]["recall_vs_exhaustive@5"] and ceiling["P=2"] >= ceiling["P=1"]
    assert ceiling["P=1"] == 1.0 and "best_possible_recall_vs_exhaustive@5" not in configs["exhaustive"]
    assert "a perfect stage 1 could reach: P=1" in format_table(report)


def test_the_report_page_shows_samples_and_plots(sessions, tmp_path):
    from PIL import Image

    from backend.pipeline.report import PLOTS, write_report

    write_folder_dataset(tmp_path / "index", n_per_class=10)
    search = ImageSearch(sessions, PixelEmbedder(), snapshot_dir=tmp_path / "snap")
    search.build_database("folder", tmp_path / "index", progress=False)
    write_folder_dataset(tmp_path / "queries", n_per_class=4, seed=1)
    stored = load_dataset("folder", data_dir=tmp_path / "index")[:1]  # skipped: positions must still be the given
    queries = stored + load_dataset("folder", data_dir=tmp_path / "queries")
    report = evaluate(search, queries, k=5, progress=False, samples=6, sample_config="P=1")
    assert [s["category"] for s in report["samples"]].count("red") == 2  # spread: two of each category
    assert all(queries[s["query"]].category == s["category"] and s["query"] > 0 for s in report["samples"])
    report["samples"][0]["category"] = "<script>alert(1)</script>"  # names are a person's: the page escapes them
    assert all(len(s["hits"]) == 5 and all(h["relevant"] for h in s["hits"]) for s in report["samples"])
    with search.sessions() as s:  # one result deleted since: the page shows a blank for it, not an error
        from backend.storage import images as image_store

        image_store.delete_images(s, [report["samples"][0]["hits"][0]["image_id"]])
        s.commit()
    page = write_report(report, {s["query"]: queries[s["query"]].read() for s in report["samples"]},
                        search.sessions, tmp_path / "report")
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)" in text
    assert text.count('class="row"') == 6 and text.count('class="hit"') == 30 and 'class="miss"' not in text
    assert "src=\"http" not in text and text.count("data:image/png;base64,") == 6 * 6 + len(PLOTS)
    for name in PLOTS:
        with Image.open(tmp_path / "report" / f"{name}.png") as plot:
            assert plot.size[0] >= 600 and plot.getextrema() != ((255, 255),) * 4  # a drawn picture, not blank


@pytest.mark.slow
def test_evaluate_command_writes_a_table_and_json(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "backend", *a], cwd=ROOT, env=cli_env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    assert run("populate", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm")).returncode == 0
    rebuilt = run("rebuild")
    assert rebuilt.returncode == 0 and "rebuilt 10 prototypes of 10 categories and the flatip index of 40" in rebuilt.stdout
    out = run("evaluate", "--queries", "20", "--k", "3", "--data-dir", str(tmp_path / "fm"), "--json",
              str(tmp_path / "r.json"), "--report", str(tmp_path / "page"), "--samples", "4")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "page" / "index.html").read_text().count('class="row"') == 4 and "wrote" in out.stdout
    assert "| exhaustive |" in out.stdout and "| P=5 |" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["queries"] == 20 and report["indexed_images"] == 40 and report["model"] == "efficientnet_lite0"
