"""The command line, run as a person would: real model (efficientnet_lite0), real PostgreSQL, no network."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, schema_head, wait_healthy, write_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


def run(env, *args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_populate_then_status_then_rerun(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=5)
    first = run(cli_env, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--num-images", "30",
                "--data-dir", str(tmp_path / "fm"))
    assert first.returncode == 0, first.stderr
    assert "added 30, 0 already stored, failed 0 in " in first.stdout
    assert "img/s" in first.stderr  # the progress bar
    status = run(cli_env, "-m", "backend", "status")
    assert status.returncode == 0, status.stderr
    assert "images:     30" in status.stdout and "categories: 10" in status.stdout
    assert "efficientnet_lite0 (1280-d): 30 embeddings, 10 prototypes" in status.stdout
    again = run(cli_env, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--num-images", "30",
                "--data-dir", str(tmp_path / "fm"))
    assert "added 0, 30 already stored, failed 0" in again.stdout and "images/s" not in again.stdout
    assert "nothing new: all 30 were already stored with their vectors" in again.stdout
    seed = run(cli_env, "db/init_system.py", "--all")
    assert seed.returncode == 0 and "rebuilt 10 prototypes of 10 categories and the flatip index of 30 efficientnet_lite0 vectors" in seed.stdout


def test_a_database_lost_during_a_command_is_one_error_line(monkeypatch, capsys):
    import sqlalchemy as sa

    from backend import cli

    def lost(args):  # what psycopg2 raises when the server goes away mid-query
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection\nunexpectedly"))

    monkeypatch.setattr(cli.ops, "cmd_status", lost)
    monkeypatch.setattr(cli.signal, "signal", lambda *handler: None)  # this process keeps its own SIGTERM handler
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lost PostgreSQL during the command (server closed the connection unexpectedly)")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["populate", "--dataset", "folder"], "needs --data-dir"),
    (["populate", "--dataset", "folder", "--data-dir", "/nonexistent"], "is not a folder"),
    (["populate", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "dataset-fashion-mnist"),
])
@pytest.mark.slow
def test_bad_input_gives_a_message_and_non_zero_exit(cli_env, args, message):
    proc = run(cli_env, "-m", "backend", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_argument_errors_exit_non_zero(cli_env):
    proc = run(cli_env, "-m", "backend", "populate", "--num-images", "0")
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
    proc = run(cli_env, "db/init_system.py")
    assert proc.returncode == 2 and "choose --setup-db" in proc.stderr


@pytest.mark.slow
def test_init_db_is_repeatable(cli_env):
    for _ in range(2):
        proc = run(cli_env, "-m", "backend", "init-db")
        assert proc.returncode == 0 and f"revision {schema_head()}" in proc.stdout


def _postmaster_alive(pgdata: Path) -> bool:
    import os

    try:
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), 0)
        return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


@pytest.mark.slow
def test_sigterm_to_the_server_leaves_no_embedded_postgres_behind(cli_env, tmp_path):
    import signal

    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}  # the embedded server, in DATA_DIR
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", 120)
    pgdata = Path(env["DATA_DIR"]) / "postgres"
    assert _postmaster_alive(pgdata)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert not _postmaster_alive(pgdata), "the embedded server outlived the API server"


@pytest.mark.slow
def test_train_projection_then_search_and_evaluate_with_the_derived_model(cli_env, tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_per_class=8)
    populated = run(cli_env, "-m", "backend", "populate", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"))
    assert populated.returncode == 0, populated.stderr
    without_head = run({**cli_env, "MODEL_NAME": "efficientnet_lite0+proj"}, "-m", "backend", "status")
    trained = run(cli_env, "-m", "backend", "train-projection", "--dim", "32", "--epochs", "3")
    assert trained.returncode == 0, trained.stderr
    assert "efficientnet_lite0+proj: head version 1 (mlp, 32-d)" in trained.stdout
    assert "epoch" in trained.stderr and "projecting into efficientnet_lite0+proj" in trained.stderr  # progress
    derived = {**cli_env, "MODEL_NAME": "efficientnet_lite0+proj"}
    status = run(derived, "-m", "backend", "status")
    assert status.returncode == 0, status.stderr
    assert "efficientnet_lite0+proj (32-d): 80 embeddings, 10 prototypes" in status.stdout, status.stdout
    evaluated = run(derived, "-m", "backend", "evaluate", "--queries", "20", "--data-dir", str(tmp_path / "fm"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "efficientnet_lite0+proj, flatip index, 80 images in 10 categories" in evaluated.stdout
    assert without_head.returncode == 2 and "has no trained head yet" in without_head.stderr
    assert "train-projection" in without_head.stderr and "Traceback" not in without_head.stderr
