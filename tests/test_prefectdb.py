"""Prefect's temporary server keeps each run in a database of the run's own (flows/prefectdb.py).

``tests/test_cli.py::test_segment_without_a_prefect_api_runs_without_prefect_and_matches_the_flow_run`` runs a
real ``segment --prefect`` and finds only the empty template left in its Prefect home; these tests cover the
parts a run does not show: a killed run's database removed later, a database the user chose left alone, and a
template that cannot be made.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys

import pytest
from prefect.settings import PREFECT_HOME, temporary_settings

from flows import prefectdb


def test_a_run_gets_a_copy_of_a_migrated_empty_database(tmp_path, monkeypatch):
    monkeypatch.delenv(prefectdb.CONNECTION_URL, raising=False)
    with temporary_settings({PREFECT_HOME: tmp_path}):
        with prefectdb.run_database() as database:
            assert database is not None and database.parent.parent == tmp_path / prefectdb.RUNS
            assert os.environ[prefectdb.CONNECTION_URL] == f"sqlite+aiosqlite:///{database}"
            with sqlite3.connect(database) as con:  # migrated: Prefect's tables, no runs
                assert con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
                assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 0
            con.close()
        assert prefectdb.CONNECTION_URL not in os.environ
    templates = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert templates == [f"{prefectdb.TEMPLATE_PREFIX}{_prefect_version()}.db"], templates
    # the file itself goes at the interpreter's exit, after Prefect's server stops (an atexit handler)


def test_a_killed_runs_database_is_removed_by_a_later_run(tmp_path, monkeypatch):
    monkeypatch.delenv(prefectdb.CONNECTION_URL, raising=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    runs = tmp_path / prefectdb.RUNS
    dead, alive, other = runs / f"{gone}-abc", runs / f"{os.getppid()}-def", runs / "notes"
    for folder in (dead, alive, other):
        folder.mkdir(parents=True)
        (folder / "prefect.db").write_bytes(b"x")
    with temporary_settings({PREFECT_HOME: tmp_path}):
        with prefectdb.run_database() as database:
            assert database is not None
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_database_the_user_chose_is_left_alone(tmp_path, monkeypatch):
    chosen = f"sqlite+aiosqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv(prefectdb.CONNECTION_URL, chosen)
    with temporary_settings({PREFECT_HOME: tmp_path / "home"}):
        with prefectdb.run_database() as database:
            assert database is None and os.environ[prefectdb.CONNECTION_URL] == chosen
    assert os.environ[prefectdb.CONNECTION_URL] == chosen and not (tmp_path / "home").exists()


def test_a_template_that_cannot_be_made_leaves_prefects_own_database_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(prefectdb.CONNECTION_URL, raising=False)
    half_made = ("import os, sqlite3, sys\n"  # a migration that fails half-way leaves a file behind
                 "sqlite3.connect(os.environ['PREFECT_API_DATABASE_CONNECTION_URL'].split(':///')[1])"
                 ".execute('CREATE TABLE flow_run (id)')\n"
                 "sys.exit('no migrations today')")
    monkeypatch.setattr(prefectdb, "_MIGRATE", half_made)
    with temporary_settings({PREFECT_HOME: tmp_path}), caplog.at_level(logging.WARNING, logger="segflow"):
        with prefectdb.run_database() as database:
            assert database is None and prefectdb.CONNECTION_URL not in os.environ
    assert list(tmp_path.glob(f"*{prefectdb.TEMPLATE_PREFIX}*")) == []  # nothing half-made looks like one
    assert [r.getMessage() for r in caplog.records] == [
        f"Prefect's temporary server keeps this run in {tmp_path}/prefect.db: a database of the run's own could not "
        f"be made (migrating {_staged(caplog.records[0].getMessage())} exited 1: no migrations today)"]


def test_a_file_that_is_not_a_migrated_database_is_refused(tmp_path):
    (tmp_path / "empty.db").touch()
    with pytest.raises(prefectdb.TemplateError, match="no such table: alembic_version"):
        prefectdb.migrated_version(tmp_path / "empty.db")


def _staged(message: str) -> str:
    return message.split("(migrating ", 1)[1].split(" exited", 1)[0]


def _prefect_version() -> str:
    import prefect

    return prefect.__version__
