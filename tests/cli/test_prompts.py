"""The command line's questions stop at Ctrl-C whenever it comes: the menu's Ctrl-C race (tests/cli/test_menu.py)."""
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.cli import prompts


@pytest.fixture
def terminal_stdin(monkeypatch):
    """stdin on a pseudo-terminal nobody types into."""
    master, slave = os.openpty()
    stdin = open(slave, "r")
    monkeypatch.setattr(sys, "stdin", stdin)
    yield master
    stdin.close()
    os.close(master)


def test_a_ctrl_c_that_lands_as_the_wait_begins_still_stops_the_question(terminal_stdin, monkeypatch):
    real, waits = select.select, []

    def racing(readers, writers, errors, timeout=None):
        assert timeout is not None  # a wait without a timeout would miss this Ctrl-C until the next key
        waits.append(timeout)
        if len(waits) > 1:
            return real(readers, writers, errors, timeout)
        # The signal arrives while the wait begins: its handler can only run once the call returns.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            os.kill(os.getpid(), signal.SIGINT)
            return real(readers, writers, errors, timeout)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    monkeypatch.setattr(select, "select", racing)
    with pytest.raises(KeyboardInterrupt):
        prompts.read_answer("Dataset? [2] ")
    assert waits == [prompts.POLL_SECONDS]


def test_an_answer_and_the_end_of_input_are_read(terminal_stdin):
    os.write(terminal_stdin, b"7\n")
    assert prompts.read_answer("How many images? ") == "7"
    assert prompts.ask_number("How many images", 1000) == 1000 if os.write(terminal_stdin, b"\n") else False


@pytest.mark.slow
def test_ctrl_c_reaches_the_tests_when_the_run_started_with_it_ignored(tmp_path):
    # A run started as `(./setup.sh test &)` or by a runner without job control: SIGINT arrives ignored. Without
    # the suite's restore_ctrl_c() the first test above waits at its question forever.
    test = f"{__file__}::test_a_ctrl_c_that_lands_as_the_wait_begins_still_stops_the_question"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path}", test],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, proc.stdout[-2000:]
