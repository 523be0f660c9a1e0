"""The local cluster's client keeps no copy of the graphs it sends: distributed keeps the last 1,000 messages
under 1 MB of each batched comm for developers, and each input's graph holds the pickled network, so a nightly
run's process grew about 1 MB per input (1.2 GB after 500 tiny inputs; the operator probe, 2026-12-06)."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np

from flows.cluster import dask_client


def _blob_sum(block: np.ndarray, blob: bytes) -> np.ndarray:
    return block + len(blob)


def test_graphs_sent_to_the_scheduler_are_not_kept_by_the_client():
    with dask_client(workers=1, threads_per_worker=1) as client:
        for _ in range(5):
            blob = os.urandom(900_000)  # a network's weights, as each input's graph carries them
            x = da.ones((64,), chunks=32).map_blocks(_blob_sum, blob=blob, dtype=float)
            assert client.compute(x.sum()).result() == 64 * (1 + 900_000)
        kept = [m for m in client.scheduler_comm.recent_message_log if not isinstance(m, str)]
        assert kept == [], f"{len(kept)} messages kept"
