"""Dask cluster set-up: a local cluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import dask
from distributed import Client, LocalCluster, WorkerPlugin


class TorchThreads(WorkerPlugin):
    """Set torch's intra-op threads in every worker so that tasks running at once do not oversubscribe cores."""

    name = "segflow-torch-threads"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker) -> None:  # noqa: ANN001
        import torch

        torch.set_num_threads(self.threads)


def worker_environ() -> dict[str, object]:
    """Dask's pre-spawn environment for worker processes, with glibc malloc tuned for big arrays.

    Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` to return memory to the OS
    eagerly; that also turns off glibc's dynamic mmap threshold, so every large
    tensor or array allocation became a fresh mmap with page faults: inference
    on a worker ran 1.6-2x slower (4096² benchmark). Instead, blocks under
    64 MiB come from the heap and are reused, the heap is trimmed past 128 MiB
    free, and two arenas limit fragmentation across threads (measured: same
    speed, about 90 MB less per worker). OMP/MKL/OpenBLAS stay at one thread:
    torch's thread count is set by :class:`TorchThreads`.
    """
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env.update(MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(128 << 20))
    return env


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextmanager
def dask_client(address: str | None = None, *, workers: int | None = None, threads_per_worker: int | None = None,
                dashboard: bool = False) -> Iterator[Client]:
    """Yield a client: to ``address``, else the process's current one, else a new local cluster.

    A local cluster defaults to one worker process with one thread per core,
    each thread's torch single-threaded. Measured at 4096² (441 windows of
    256², 2 cores; benchmarks/predict_vs_monai.py --only-segflow): 1 worker x 2
    threads ran exact/fast in 3.59/2.53 s, 2 workers x 1 thread in 3.82/2.56 s,
    and 1 worker x 1 thread with 2 torch threads in 4.27/3.19 s. One process also
    holds one copy of torch and the model instead of one per core. ``workers``
    asks for more processes (the cores are shared out between them).
    """
    if address:
        client = Client(address)
        try:
            yield client
        finally:
            client.close()
        return
    try:
        from distributed import get_client

        existing = get_client()
    except ValueError:
        existing = None
    if existing is not None and workers is None:
        yield existing
        return
    for name in ("distributed", "distributed.batched", "distributed.nanny", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cores = available_cores()
    n = workers or 1
    threads = threads_per_worker or max(1, cores // n)
    # set for the process, not a block: a worker restarted after a crash is spawned later
    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                           dashboard_address=":0" if dashboard else None, silence_logs=40)
    client = Client(cluster)
    client.register_plugin(TorchThreads(max(1, cores // (n * threads))))
    try:
        yield client
    finally:
        client.close()
        cluster.close()
