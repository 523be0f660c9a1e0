"""Shared fixtures: an isolated Prefect home, a real multi-process Dask cluster, paths to shared data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports Prefect: a private, throw-away Prefect home and quiet logs.
_PREFECT_HOME = tempfile.mkdtemp(prefix="segflow-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # one was left in /tmp by every test session
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Flows called directly start Prefect's ephemeral server; on 2 busy cores it can need more than Prefect's 20 s
# (test_s3 alone with test_stacitem timed out every time), so give it what `segflow nightly` gives it (120 s).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["SEGFLOW_LOG_DIR"] = str(Path(_PREFECT_HOME) / "segflow-logs")  # run logs of tested runs stay out of ~

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(relative: str) -> Path:
    """A file of ../shared/data, or skip when that folder is absent (a user's fresh clone)."""
    path = SHARED_DATA / relative
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real test data is only beside the project's own checkout)")
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def dask_cluster():
    """Two single-threaded worker processes on loopback, set up as `segflow` sets up a local cluster."""
    from flows.cluster import dask_client

    with dask_client(workers=2, threads_per_worker=1) as client:
        yield client
