"""Prefect's temporary server gets a database of its own for each run, removed when the run ends.

Where no Prefect API is configured, Prefect runs a temporary server whose SQLite
database is ``$PREFECT_HOME/prefect.db``: one file for every run of the account,
never trimmed (about 11 MB more per nightly run of 260 inputs, measured
2026-12-06).  No later segflow run reads it: the ledger, reports and provenance
in OUT are the record.  So a run whose user configured no database gets its own
file under ``$PREFECT_HOME/segflow-runs/``, removed after the temporary server
stops at the command's exit; a killed run's file is removed by a later run once
its process is gone.  A new database costs Prefect's migrations (7.8 s on this
project's 2-core machine), so the first run makes an empty migrated one, kept
per Prefect version as ``segflow-empty-prefect-<version>.db``, and each run
starts from a copy.  Where that cannot be made, the run uses Prefect's own
database, as it did before, and says why in its log file.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CONNECTION_URL = "PREFECT_API_DATABASE_CONNECTION_URL"
RUNS = "segflow-runs"
TEMPLATE_PREFIX = "segflow-empty-prefect-"
TEMPLATE_TIMEOUT_S = 300
# any of these set (environment, profile, .env): the user chose a database, which segflow leaves alone
USER_DATABASE_FIELDS = frozenset({"connection_url", "driver", "host", "port", "user", "name", "password"})

_MIGRATE = """
import asyncio
from prefect.server.database import provide_database_interface
asyncio.run(provide_database_interface().create_db())
"""


class TemplateError(Exception):
    """The empty migrated database could not be made or read."""


def _database_chosen_by_user() -> bool:
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database
    return bool(set(database.model_fields_set) & USER_DATABASE_FIELDS) or bool(os.environ.get(CONNECTION_URL))


def migrated_version(path: Path) -> str:
    """The alembic revision of a database file, after folding any write-ahead log into it (a copy of the main
    file alone would miss what the log holds)."""
    try:
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
        con.close()
    except sqlite3.Error as exc:
        raise TemplateError(f"{path}: {exc}") from None
    if not row or not row[0]:
        raise TemplateError(f"{path}: no migration recorded")
    return str(row[0])


def template(home: Path) -> Path:
    """The empty database migrated for this Prefect version, made once per ``home`` (two runs that make it at
    once each write their own and the last rename wins; both are whole)."""
    import prefect

    path = home / f"{TEMPLATE_PREFIX}{prefect.__version__}.db"
    if path.is_file():
        return path
    home.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=home)
    os.close(fd)
    staged = Path(name)
    staged.unlink()  # an empty file is not a SQLite database to migrate
    env = {**os.environ, CONNECTION_URL: f"sqlite+aiosqlite:///{staged}"}
    try:
        done = subprocess.run([sys.executable, "-c", _MIGRATE], env=env, capture_output=True, text=True,
                              timeout=TEMPLATE_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise TemplateError(f"migrating {staged} exited {done.returncode}: {last}")
        migrated_version(staged)
        os.replace(staged, path)
    except subprocess.TimeoutExpired:
        raise TemplateError(f"migrating {staged} took over {TEMPLATE_TIMEOUT_S} s") from None
    finally:
        for leftover in home.glob(f"{staged.name}*"):
            leftover.unlink(missing_ok=True)
    for old in home.glob(f"{TEMPLATE_PREFIX}*.db"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _prune(runs: Path) -> None:
    """Remove the databases of runs whose process is gone (``<pid>-*`` folders)."""
    from flows.locks import pid_alive

    for folder in runs.glob("*-*"):
        pid = folder.name.partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def run_database() -> Iterator[Path | None]:
    """While entered, a temporary server started by this process keeps its runs in a database of this run's own
    (its path), or in Prefect's own where the user chose a database or none could be made (None).

    The file is removed at the interpreter's exit, after the server that
    Prefect stops there (its ``atexit`` handler, registered when it starts,
    runs first), so the server never writes into a removed folder.
    """
    from prefect.settings import get_current_settings

    if _database_chosen_by_user():
        yield None
        return
    home = Path(get_current_settings().home).expanduser()
    try:
        empty = template(home)
        runs = home / RUNS
        runs.mkdir(parents=True, exist_ok=True)
        _prune(runs)
        folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=runs))
        database = folder / "prefect.db"
        shutil.copyfile(empty, database)
    except (OSError, TemplateError) as exc:
        logging.getLogger("segflow").warning("Prefect's temporary server keeps this run in %s/prefect.db: a "
                                             "database of the run's own could not be made (%s)", home, exc)
        yield None
        return
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[CONNECTION_URL] = f"sqlite+aiosqlite:///{database}"  # the server's process reads its environment
    try:
        yield database
    finally:
        os.environ.pop(CONNECTION_URL, None)  # unset on entry (else the user chose a database)
