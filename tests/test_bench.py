"""Every benchmark in bench/ runs on tiny data, so a change of schema or API that breaks one fails here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_fashion_mnist, write_folder_dataset

ROOT = Path(__file__).resolve().parent.parent

# script -> its arguments for a run of seconds (the figures mean nothing; that the script runs through does)
TINY = {
    "search.py": ["--size", "3000", "--dim", "32", "--categories", "4", "--queries", "5", "--types", "rabitq", "flatip",
                  "--hnsw-size", "500", "--exact-queries", "2", "--fashion", "2", "--fashion-cache", "{tmp}/vectors"],
    "fashion_vectors.py": ["--copies", "3", "--cache", "{tmp}/vectors"],
    "partition_layouts.py": ["--n", "600", "--dim", "32", "--categories", "4", "--queries", "10"],
    "embed.py": ["--models", "efficientnet_lite0", "--images", "8", "--data-dir", "{fm}"],
    "ingest.py": ["--images", "24"],
    "duplicates.py": ["--fashion", "10"],
    "sync.py": ["--repeats", "1"],
    "load.py": ["--images", "40", "--concurrency", "1", "2", "--requests", "8", "--workers", "2", "--baseline", "HEAD"],
    "reembed.py": ["--images", "12", "--phase-seconds", "2"],
    "examples.py": ["--trials", "4", "--positives", "2", "--weights", "0.25"],
}


@pytest.fixture
def bench_env(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=6)
    # Without PYTEST_CURRENT_TEST: scikit-image's data fetchers raise pytest's Skipped when they see it.
    env = {k: v for k, v in cli_env.items() if k != "PYTEST_CURRENT_TEST"}
    return {**env, "FASHION_MNIST_DIR": str(tmp_path / "fm")}


# script -> the test that runs it on tiny data and asserts its targets
ELSEWHERE = {"soak.py": "tests/service/test_soak.py"}


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"common.py", "ann.py"}  # ann.py: search.py's
    assert scripts == set(TINY) | set(ELSEWHERE)
    for script, test in ELSEWHERE.items():
        assert f"bench/{script}" in (ROOT / test).read_text()


@pytest.mark.slow
# ingest.py starts a local Ray cluster: never beside tests/pipeline/test_ray_ingest.py's, which `ray stop`s its own
@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.xdist_group("ray")) if s == "ingest.py" else s
                                    for s in sorted(TINY)])
def test_benchmark_runs_on_tiny_data(script, bench_env, tmp_path):
    if script == "examples.py":  # it measures a populated collection
        write_folder_dataset(tmp_path / "f", n_per_class=4)
        populated = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "folder", "--data-dir",
                                    str(tmp_path / "f")], cwd=ROOT, env=bench_env, capture_output=True, text=True,
                                   timeout=300)
        assert populated.returncode == 0, populated.stderr[-2000:]
    out = tmp_path / "out.json"
    args = [a.replace("{fm}", str(tmp_path / "fm")).replace("{tmp}", str(tmp_path)) for a in TINY[script]]
    done = subprocess.run([sys.executable, f"bench/{script}", *args, "--json", str(out)], cwd=ROOT, env=bench_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] is not None  # every figure says what it was measured on
    if script == "search.py":  # a pre-filter is exact for every type, the compressed one's re-scored from disk
        filtered = {r["method"]: r["recall_at_10"] for d in report["datasets"] for r in d["rows"]
                    if "filtered" in r["method"] and r["method"].startswith("imsrc")}
        assert filtered and all(recall == 1.0 for recall in filtered.values()), filtered
        # rabitq first: the ground truth is brute force over PostgreSQL's vectors, which flat search over every
        # category (P=10 of 4 categories, or of Fashion-MNIST's 10) must match exactly
        everywhere = [r["recall_at_10"] for r in report["datasets"][0]["rows"] if r["method"] == "imsrc flatip P=10"]
        assert everywhere == [1.0], report["datasets"][0]["rows"]
        for dataset in report["datasets"]:  # what PostgreSQL holds per vector, as vector and as halfvec
            storage = dataset["storage"]
            assert 0 < storage["halfvec_bytes_per_vector"] < storage["vector_bytes_per_vector"], storage
            assert 0.9 <= storage["halfvec_recall_at_10"] <= 1.0, storage


def test_every_faiss_baseline_reaches_high_recall_at_its_widest_setting():
    """A baseline set up wrongly (RaBitQ given plain IVF parameters quantised its queries to 4 bits: recall@10 0.7
    at any nprobe) would make imsrc look better than it is."""
    import numpy as np

    from bench.ann import at_recall, faiss_baselines

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 256))
    # Non-negative, as a CNN's pooled features are: where 4-bit queries lost most (0.835 here with plain IVF
    # parameters, 0.985 with RaBitQ's own)
    vectors = np.maximum(centres[rng.integers(0, 20, 4000)] + 0.6 * rng.standard_normal((4000, 256)) - 1.0, 0) + 0.05
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries, base = vectors[:20], vectors[20:]
    ids = np.arange(100, 100 + len(base))
    truth = [ids[np.argsort(-(base @ q))[:10]] for q in queries]
    rows, builds = faiss_baselines("tiny", base, ids, queries, truth, rss_mib=lambda: 0.0)
    assert {b["index"].split(",")[0][:3] for b in builds} == {"HNS", "IVF"} and len(builds) == 3
    for entry in at_recall(rows, recalls=(0.95,)):
        assert entry["p50_ms_at_0.95"] is not None, entry  # every family gets there


def test_the_ground_truth_is_the_brute_force_top_10_of_the_stored_vectors(engine, sessions):
    """What every recall in bench/search.py is measured against, whichever index type comes first."""
    import numpy as np

    from bench.ann import K
    from bench.search import CHUNK, Synthetic, brute_force, load_dataset

    data = Synthetic(CHUNK + 500, 16, 3, 0.45)  # two batches of the bulk reader's, so that merging them counts
    load_dataset(engine, data.chunks(), 16, 3, data.size)
    vectors = np.concatenate([v for _, _, v in data.chunks()])
    ids = np.arange(1, data.size + 1)
    queries = data.queries(20)
    among = ids[ids % 7 == 0]
    for subset, found in ((ids, brute_force(sessions, 16, queries)),
                          (among, brute_force(sessions, 16, queries, among))):
        scores = queries @ vectors[subset - 1].T
        expected = subset[np.lexsort((np.broadcast_to(subset, scores.shape), -scores), axis=1)[:, :K]]
        assert [f.tolist() for f in found] == expected.tolist()
