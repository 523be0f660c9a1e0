"""segflow's local clusters turn numpy's huge-page advice off, in this process and in worker processes.

Where the kernel's ``transparent_hugepage/defrag`` is ``madvise`` (this
project's machines), first-touched numpy memory cost 25x more with the advice
(``flows.cluster.numpy_hugepages_off``). Each case runs in a fresh Python, so
that nothing this pytest process did before decides the answer, with a real
local cluster of one worker process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os
from flows.cluster import NUMPY_HUGEPAGE_ENV, dask_client

def _get_madvise_hugepage():
    try:  # numpy >= 2, then numpy 1.x (pyproject allows both)
        from numpy._core.multiarray import _get_madvise_hugepage as get
    except ImportError:
        from numpy.core.multiarray import _get_madvise_hugepage as get
    return get()

def worker_state():
    import os
    return os.environ.get(NUMPY_HUGEPAGE_ENV), bool(_get_madvise_hugepage())

before = bool(_get_madvise_hugepage())
with dask_client(workers=1, threads_per_worker=1) as client:
    here = bool(_get_madvise_hugepage())
    (worker,) = client.run(worker_state).values()
print(json.dumps({"before": before, "here": here, "worker_env": worker[0], "worker": worker[1]}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if env_value is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = env_value
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="numpy advises huge pages on Linux only")
def test_local_cluster_turns_numpy_hugepages_off_here_and_in_workers():
    state = _probe(None)
    if not state["before"]:
        pytest.skip("numpy does not advise huge pages on this kernel (before 4.6), so there is nothing to turn off")
    assert state == {"before": True, "here": False, "worker_env": "0", "worker": False}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="numpy advises huge pages on Linux only")
def test_the_users_choice_of_numpy_hugepages_is_kept():
    state = _probe("1")
    if not state["before"]:
        pytest.skip("numpy does not advise huge pages on this kernel (before 4.6), so there is nothing to keep")
    assert state == {"before": True, "here": True, "worker_env": "1", "worker": True}
