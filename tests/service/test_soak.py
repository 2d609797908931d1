"""The fault soak's two-minute version (bench/soak.py): every fault recovered within 10 s, no unexpected 5xx, no
acknowledged write lost, `check` passes."""
import json
import subprocess
import sys

import pytest

from bench.soak import distinct_tail
from tests.helpers import ROOT, write_fashion_mnist

pytestmark = [pytest.mark.slow, pytest.mark.minutes]


def test_two_minutes_of_mixed_load_and_four_faults(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=6)
    env = {k: v for k, v in cli_env.items() if k != "PYTEST_CURRENT_TEST"}  # scikit-image's fetchers skip on it
    env["FASHION_MNIST_DIR"] = str(tmp_path / "fm")
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "bench/soak.py", "--minutes", "2", "--fault-every", "25",
                           "--stop-seconds", "8", "--full-seconds", "8", "--images", "40", "--json", str(out),
                           "--log", str(tmp_path / "serve.log")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [f["fault"] for f in report["faults"]] == ["kill -9 PostgreSQL", "kill -9 a worker", "SIGSTOP PostgreSQL",
                                                     "disk full"]
    recovered = [f["recovery_s"] for f in report["faults"] if "skipped" not in f]
    # Messages as strings: pytest shortens an object's repr to a line, and a soak's failure needs all of it.
    assert recovered and all(s is not None and s < 10 for s in recovered), _explain(report["faults"], tmp_path)
    assert report["unexpected_5xx"] == 0, _explain(report["unexpected_samples"], tmp_path)
    assert report["acknowledged_uploads"] > 20 and report["lost_writes"] == 0
    assert report["by_route"]["POST /search"].get("200", 0) > 100  # JSON keys are strings
    assert report["check_exit"] == 0 and report["server_tracebacks"] == 0, report


def _explain(what, tmp_path) -> str:
    """`what` and the server log's last distinct warnings and errors, for a failure's message."""
    lines = (tmp_path / "serve.log").read_text(errors="replace").splitlines()
    warnings = distinct_tail((line for line in lines if not line.startswith("INFO")), 40)
    return json.dumps({"report": what, "server_warnings": warnings}, indent=1)
