"""One engine per machine: the measured precision and runtime are stored in the data folder and reused by every
process and restart; a changed key measures again; OpenVINO's converted model is kept and gives the same vectors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.embedding.calibration import RULES, EngineChoices, machine_key
from backend.embedding.models import create_embedder
from backend.embedding.precision import calibration_images

ROOT = Path(__file__).resolve().parents[2]


def _lite0(engine_dir, **settings):
    return create_embedder("efficientnet_lite0", device="cpu", engine_dir=engine_dir, **settings)


def _with_key(engine_dir, **settings):
    """An embedder and the key its load will look up: the key names the weights file, which a model finds as it
    loads, so it is given here as a pinned load (nothing measured) found it."""
    embedder = _lite0(engine_dir, **settings)
    embedder.weights_path = _lite0(None, precision="fp32", runtime="torch").load().weights_path
    return embedder, machine_key(embedder)


def test_a_stored_choice_is_used_instead_of_measuring(tmp_path):
    # A choice no measurement here would make (bf16 under PyTorch, though OpenVINO is many times faster): only
    # the store can have set it.
    embedder, key = _with_key(tmp_path)
    EngineChoices(tmp_path).put(key, "bf16", "measured elsewhere", "torch", "PyTorch there")
    embedder.load()
    assert (embedder.precision, embedder.runtime_in_use) == ("bf16", "torch")
    assert embedder.precision_reason.startswith("measured elsewhere; measured ") and "stored" in embedder.precision_reason
    assert embedder.embed(calibration_images(2)).shape == (2, embedder.dim)


def test_a_choice_made_under_other_versions_or_settings_is_measured_again(tmp_path):
    choices = EngineChoices(tmp_path)
    embedder, key = _with_key(tmp_path, runtime="torch")
    for changed in ({"torch": "0.0"}, {"rules": RULES + 1}, {"cpu_flags": "other"}, {"runtime_setting": "auto"}):
        choices.put({**key, **changed}, "bf16", "stale", "torch", "stale")
    embedder.load()
    assert "stale" not in embedder.precision_reason and "stored" not in embedder.precision_reason
    assert choices.get(key)["precision"] == embedder.precision  # measured, and stored beside the others
    assert len(json.loads(choices.file.read_text())) == 5
    assert choices.forget("efficientnet_lite0") == 5 and choices.get(key) is None


@pytest.mark.slow
def test_two_processes_starting_at_once_measure_once_and_run_the_same_engine(tmp_path):
    load = ("import sys; from backend.embedding.models import create_embedder; "
            "e = create_embedder('efficientnet_lite0', device='cpu', runtime='torch', engine_dir=sys.argv[1]).load(); "
            "print(e.precision, '|', e.precision_reason)")
    procs = [subprocess.Popen([sys.executable, "-c", load, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    lines = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), lines
    precisions = {line.split(" | ")[0] for line in lines}
    assert len(precisions) == 1, lines  # the same engine in both
    assert sum("stored" in line for line in lines) == 1, lines  # one measured, the other waited and reused it
    assert len(json.loads(EngineChoices(tmp_path).file.read_text())) == 1


@pytest.mark.slow
def test_openvinos_converted_model_is_kept_and_gives_the_same_vectors(tmp_path):
    pytest.importorskip("openvino")
    images = calibration_images(4)
    first = _lite0(tmp_path, precision="fp32", runtime="openvino").load()
    converted = list(EngineChoices(tmp_path).openvino_dir.glob("*.xml"))
    assert len(converted) == 1 and converted[0].with_suffix(".bin").stat().st_size > 1_000_000
    assert any((EngineChoices(tmp_path).openvino_dir / "blobs").iterdir())  # OpenVINO's compiled-model cache
    before = converted[0].stat().st_mtime_ns
    again = _lite0(tmp_path, precision="fp32", runtime="openvino").load()
    assert again.runtime_in_use == "openvino" and converted[0].stat().st_mtime_ns == before  # read, not converted
    a, b = first.embed(images), again.embed(images)
    reference = _lite0(None, precision="fp32", runtime="torch").embed(images)
    assert (a * b).sum(1).min() > 0.9999 and (b * reference).sum(1).min() > 0.999
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_calibrate_measures_again_and_replaces_the_stored_choice(cli_env):
    env = {**cli_env, "EMBED_PRECISION": "auto", "EMBED_RUNTIME": "torch"}
    calibrate = [sys.executable, "-m", "backend", "calibrate"]
    done = subprocess.run(calibrate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("efficientnet_lite0: torch, ") and "stored in" in done.stdout
    choices = EngineChoices(Path(env["DATA_DIR"]) / "engines")
    stored = json.loads(choices.file.read_text())
    (digest, record), = stored.items()
    record["precision_reason"] = "fabricated"
    choices.file.write_text(json.dumps(stored))
    done = subprocess.run(calibrate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fabricated" not in done.stdout, done.stdout + done.stderr[-2000:]
    assert json.loads(choices.file.read_text())[digest]["precision_reason"] != "fabricated"
    pinned = subprocess.run(calibrate, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert pinned.returncode != 0 and "nothing to measure" in pinned.stderr and "Traceback" not in pinned.stderr
