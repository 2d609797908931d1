"""Errors by type: one map from domain errors to HTTP statuses, and a server shutting down answers 503."""
import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.errors import (Conflict, DatabaseError, ImsrcError, InvalidImage, InvalidQuery, NotFound, ShuttingDown,
                            UnsupportedFormat, http_status)
from backend.pipeline.reembed import ModelNotReady
from backend.storage.collections import CollectionExists, create_collection
from tests.helpers import folder_opener


@pytest.mark.parametrize("error, status", [
    (NotFound("x"), 404), (UnsupportedFormat("unsupported"), 415), (InvalidImage("unsupported image format too"), 400),
    (InvalidQuery("x"), 422), (Conflict("x"), 409), (CollectionExists("x"), 409), (ModelNotReady("x"), 409),
    (DatabaseError("x"), 503), (ShuttingDown("x"), 503), (ImsrcError("x"), 400)])
def test_the_status_follows_the_class_not_the_message(error, status):
    assert http_status(error) == status


def test_a_server_shutting_down_answers_503_with_retry_after(sessions, tmp_path):
    app = create_app(folder_opener(sessions, tmp_path, n_per_class=1))
    with TestClient(app) as client:
        served = app.state.collections
        assert client.get("/categories").status_code == 200
        served.close()  # what the lifespan does when the server stops: requests still in flight meet it
        answer = client.get("/categories", params={"collection": "another"})
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert "shutting down" in answer.json()["detail"]
        app.state.collections = None  # closed already: the lifespan's own close has nothing left to do


def test_a_database_error_answers_503_without_saying_where_the_database_is(sessions, tmp_path, caplog):
    where = "postgresql://imsrc:***@/imsrc?host=/tmp/pg-sock-7"
    socket = 'connection to server on socket "/tmp/pg-sock-7/.s.PGSQL.5432" failed: FATAL: sorry, too many clients'

    def unreachable(name, collection_sessions):
        raise DatabaseError(f"cannot connect to PostgreSQL at {where}: {socket}")

    app = create_app(folder_opener(sessions, tmp_path, n_per_class=1), open_collection=unreachable)
    create_collection(sessions.kw["bind"], "another")
    with TestClient(app) as client:
        answer = client.get("/categories", params={"collection": "another"})
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert answer.json() == {"detail": "the database cannot be reached; try again shortly"}
    assert socket in caplog.text  # the operator's log says what happened
