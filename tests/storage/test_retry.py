"""A transaction PostgreSQL aborts to break a deadlock is run again, and its work is done once (real
PostgreSQL, a real deadlock)."""
import threading

import pytest
import sqlalchemy as sa

from backend.storage.retry import run_transaction


@pytest.fixture
def two_rows(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE counters (id int PRIMARY KEY, n int)"))
        conn.execute(sa.text("INSERT INTO counters VALUES (1, 0), (2, 0)"))
    return engine


def _bump(session, row: int) -> None:
    session.execute(sa.text("UPDATE counters SET n = n + 1 WHERE id = :id"), {"id": row})


def test_the_deadlocks_victim_runs_again_and_its_work_is_done_once(two_rows, sessions):
    other_holds_2, work_holds_1 = threading.Event(), threading.Event()
    attempts = []

    def other():  # row 2, then row 1: the opposite order; patient, so that PostgreSQL aborts the work
        with two_rows.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '30s'"))
            conn.execute(sa.text("UPDATE counters SET n = n + 10 WHERE id = 2"))
            other_holds_2.set()
            work_holds_1.wait(30)
            conn.execute(sa.text("UPDATE counters SET n = n + 10 WHERE id = 1"))

    def work(session):
        attempts.append(1)
        session.execute(sa.text("SET LOCAL deadlock_timeout = '100ms'"))
        _bump(session, 1)
        if len(attempts) == 1:
            other_holds_2.wait(30)
            work_holds_1.set()
        _bump(session, 2)  # the first time: waits for `other`, which waits for this: a deadlock
        return len(attempts)

    thread = threading.Thread(target=other)
    thread.start()
    assert run_transaction(sessions, work) == 2
    thread.join(30)
    with two_rows.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT id, n FROM counters")).all()) == {1: 11, 2: 11}


def test_other_errors_are_not_run_again(two_rows, sessions):
    attempts = []

    def work(session):
        attempts.append(1)
        session.execute(sa.text("UPDATE counters SET n = 1 / 0"))

    with pytest.raises(sa.exc.DataError):
        run_transaction(sessions, work)
    assert len(attempts) == 1
