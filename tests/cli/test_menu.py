"""The set-up menu and the demo, driven as a person would: `./setup.sh` in a pseudo-terminal (pexpect),
with a real PostgreSQL, the real offline model and a small Fashion-MNIST-shaped dataset; no network used."""
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pexpect
import pytest
from PIL import Image

from tests.helpers import free_port, png_bytes, wait_healthy, write_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def menu_env(cli_env, tmp_path):
    """The CLI's test environment plus a private Fashion-MNIST, no local CIFAR-10 and a free API port."""
    write_fashion_mnist(tmp_path / "fm", n_per_class=4)
    (tmp_path / "no-cifar").mkdir()
    return {**cli_env, "FASHION_MNIST_DIR": str(tmp_path / "fm"), "CIFAR10_DIR": str(tmp_path / "no-cifar"),
            "API_PORT": str(free_port()), "HUB_TIMEOUT": "2", "TERM": "dumb"}


def _quit(child: pexpect.spawn) -> None:
    child.sendline("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _menu(env) -> pexpect.spawn:
    child = pexpect.spawn("bash", ["setup.sh"], cwd=str(ROOT), env=env, encoding="utf-8", timeout=180,
                          dimensions=(50, 250))
    child.expect("imsrc set-up")
    child.expect("Choose: ")
    return child


@pytest.mark.slow
def test_menu_survives_a_failing_step_populates_shows_status_serves_and_quits(menu_env, tmp_path):
    child = _menu(menu_env)
    # A populate that fails (a folder that is not there) is reported in one line, and the menu comes back.
    child.sendline("3")
    child.expect(r"Fashion-MNIST \(local copy in")
    child.expect(r"Dataset\? \[\d\] ")
    child.sendline("3")
    child.expect("Folder")
    child.sendline(str(tmp_path / "missing"))
    child.expect(r"How many images\? \[all\] ")
    child.sendline("")
    child.expect("is not a folder")
    child.expect(r"failed \(exit 2\): see the error above, then choose 3 again")
    child.expect(r"imsrc set-up.{0,12}database: external [^|]+, reachable \| 0 images")
    child.expect("Choose: ")
    # Fashion-MNIST populates a few images; the state line then counts them.
    child.sendline("3")
    child.expect(r"Dataset\? \[\d\] ")
    child.sendline("2")
    child.expect(r"How many images\? \[1000\] ")
    child.sendline("20")
    child.expect("added 20, 0 already stored")
    child.expect(r"imsrc set-up.{0,12}database: [^|]+ \| 20 images \| model: efficientnet_lite0")
    child.expect("Choose: ")
    child.sendline("8")
    child.expect(r"images:\s+20")
    child.expect(r"efficientnet_lite0 \(1280-d\): 20 embeddings, 10 prototypes")
    child.expect("Choose: ")
    # The server starts; Ctrl-C stops it and brings the menu back, with the index now ready.
    child.sendline("5")
    child.expect("Application startup complete")
    assert wait_healthy(f"http://127.0.0.1:{menu_env['API_PORT']}", 60)
    child.sendcontrol("c")
    child.expect(r"imsrc set-up.{0,12}database: [^|]+ \| 20 images \| [^|]+ \| index ready")
    child.expect("Choose: ")
    _quit(child)


@pytest.mark.slow
def test_menu_ignores_unknown_choices_and_leaves_at_end_of_input(menu_env):
    child = _menu(menu_env)
    child.sendline("9")
    child.expect("unknown choice: 9")
    child.expect("Choose: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_during_a_step_returns_to_the_menu(menu_env):
    child = _menu(menu_env)
    child.sendline("3")
    child.expect(r"Dataset\? \[\d\] ")
    child.sendcontrol("c")
    child.expect("interrupted at a question: nothing was started")  # not "batches already stored are kept"
    child.expect(r"stopped \(Ctrl-C\)")
    child.expect("Choose: ")
    _quit(child)


@pytest.mark.slow
def test_subcommands_still_fail_with_a_non_zero_exit(menu_env):
    proc = subprocess.run(["bash", "setup.sh", "populate", "5", "folder"], cwd=ROOT, env=menu_env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "needs --data-dir" in proc.stderr
    proc = subprocess.run(["bash", "setup.sh", "nonsense"], cwd=ROOT, env=menu_env, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def _start(env, *args, log: Path) -> subprocess.Popen:
    # A session of its own, so that the whole group (bash, python) can be stopped as Ctrl-C would.
    return subprocess.Popen(["bash", "setup.sh", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)


@pytest.mark.slow
def test_after_an_offline_demo_serve_uses_the_demos_model_and_finds_its_images(menu_env, tmp_path):
    # Exactly what a new user has after cloning: no model, the embedded server, the engine measured at start.
    env = {k: v for k, v in menu_env.items() if k not in ("MODEL_NAME", "DATABASE_URL", "EMBED_PRECISION",
                                                          "EMBED_RUNTIME")}
    env.update(IMSRC_DEMO_OFFLINE="1", DEMO_IMAGES="30")
    base = f"http://127.0.0.1:{env['API_PORT']}"
    demo = _start(env, "demo", log=tmp_path / "demo.log")
    try:
        assert wait_healthy(base, 300, alive=lambda: demo.poll() is None), (tmp_path / "demo.log").read_text()[-3000:]
        assert httpx.get(base + "/status").json()["index_size"] == 30
    finally:
        _stop(demo)

    serve = _start(env, "serve", log=tmp_path / "serve.log")
    try:
        assert wait_healthy(base, 180, alive=lambda: serve.poll() is None), (tmp_path / "serve.log").read_text()[-3000:]
        status = httpx.get(base + "/status").json()
        assert status["model"] == "efficientnet_lite0" and status["index_size"] == 30 and status["notice"] is None
        query = png_bytes(Image.new("L", (28, 28), 40))
        hits = httpx.post(base + "/search", files={"file": ("q.png", query, "image/png")}, timeout=60).json()
        assert hits["results"] and all(h["category"] for h in hits["results"])
        first = httpx.get(base + hits["results"][0]["image_url"])
        assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    finally:
        _stop(serve)
    assert "the model of the 30 efficientnet_lite0 vectors in the database" in (tmp_path / "serve.log").read_text()
