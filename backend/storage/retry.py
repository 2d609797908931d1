"""Transactions PostgreSQL aborted to break a deadlock (or a serialization conflict), run again.

Such an abort says nothing is wrong with the work, only with its timing against another transaction's (an
upload's prototype update meeting a deletion's, a re-embed's group of batches meeting both), and PostgreSQL's
documentation asks the client to retry it. Everything the transaction wrote was rolled back, so running it again
from the start is safe.
"""
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
RETRIED_SQLSTATES = ("40P01", "40001")  # deadlock_detected, serialization_failure
ATTEMPTS = 4
PAUSE_S = 0.05  # before the second attempt, doubling after: random within it, so two victims do not meet again

T = TypeVar("T")


def retried(exc: BaseException) -> bool:
    """Whether a database error is an abort that running the transaction again settles."""
    return getattr(getattr(exc, "orig", None), "pgcode", None) in RETRIED_SQLSTATES


def run_transaction(sessions: Callable[[], Session], work: Callable[[Session], T], attempts: int = ATTEMPTS) -> T:
    """work(session) in a transaction of its own, committed; run again from the start, up to `attempts` times in
    all, while PostgreSQL aborts it to break a deadlock or a serialization conflict."""
    for attempt in range(1, attempts + 1):
        try:
            with sessions() as session, session.begin():
                return work(session)
        except sa.exc.DBAPIError as exc:
            if not retried(exc) or attempt == attempts:
                raise
            log.info("transaction aborted by PostgreSQL (%s), running it again (attempt %d of %d)",
                     str(exc.orig).splitlines()[0], attempt + 1, attempts)
            time.sleep(random.uniform(0, PAUSE_S * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")
