"""The retry policy of the flows (`is_transient`), on real errors: a locked SQLite database (through
sqlite3 and through SQLAlchemy, as MLflow's store raises it), MLflow errors by code, network errors."""

import sqlite3

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from spacy_llm_components.flows.settings import is_transient

from spacy_llm_components.data import DataError


@pytest.fixture
def locked_db(tmp_path):
    """A SQLite file another connection holds an exclusive lock on."""
    path = tmp_path / "store.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    yield path
    holder.rollback()
    holder.close()


def test_a_locked_sqlite_database_is_transient(locked_db):
    other = sqlite3.connect(locked_db, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="database is locked") as err:
        other.execute("insert into t values (1)")
    other.close()
    assert is_transient(err.value)


def test_a_locked_database_through_sqlalchemy_is_transient(locked_db):
    from sqlalchemy import create_engine, exc, text

    engine = create_engine(f"sqlite:///{locked_db}", connect_args={"timeout": 0})
    with pytest.raises(exc.OperationalError, match="database is locked") as err:
        with engine.begin() as conn:
            conn.execute(text("insert into t values (1)"))
    engine.dispose()
    assert is_transient(err.value)


def test_other_sqlite_errors_are_not(tmp_path):
    with pytest.raises(sqlite3.OperationalError, match="no such table") as err:
        sqlite3.connect(tmp_path / "empty.db").execute("select * from missing")
    assert not is_transient(err.value)


def test_mlflow_errors_are_transient_by_their_code(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as bad_filter:  # a real INVALID_PARAMETER_VALUE from the store
        client.search_runs(["0"], "this is not a filter")
    assert bad_filter.value.error_code == "INVALID_PARAMETER_VALUE" and not is_transient(bad_filter.value)
    with pytest.raises(MlflowException) as missing:
        client.get_run("0" * 32)
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST" and not is_transient(missing.value)
    for code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):  # what a REST tracking server answers
        error = RestException({"error_code": code, "message": "the tracking server is busy"})
        assert error.error_code == code and is_transient(error)
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}))
    assert is_transient(MlflowException("(sqlite3.OperationalError) database is locked"))  # INTERNAL_ERROR


@pytest.mark.parametrize("error, transient", [
    (None, False),
    (ConnectionError("refused"), True),
    (TimeoutError("slow"), True),
    (requests.ConnectionError("refused"), True),
    (requests.Timeout("slow"), True),
    (DataError("train.csv", "line 3", "empty 'text'"), False),
    (ValueError("bad setting"), False),
    (KeyError("x"), False),
])
def test_network_errors_are_transient_bad_input_is_not(error, transient):
    assert is_transient(error) is transient
