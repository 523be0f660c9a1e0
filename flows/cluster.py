"""Dask cluster set-up: a local cluster sized to the machine, one worker per GPU, or an existing scheduler.

A local cluster's scheduler always serves HTTP (health, metrics, and the
dashboard when bokeh is installed), on port 8787 unless told otherwise; when
another cluster holds 8787, Dask moves to a free port with a three-line
``UserWarning`` ("Port 8787 is already in use ...") that reads like a fault to
the person running segflow.  So every local cluster here binds a free port from
the start (``:0``), and the command says once where its dashboard is
(:func:`dashboard_line`), as a plain line the user can silence with ``--quiet``.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator

import dask
from distributed import Client, LocalCluster, Worker, WorkerPlugin
from distributed.core import Status

from storage.errors import ConfigError, error_names

GPU = "GPU"  # the worker resource GPU tasks ask for: workers started with `--resources GPU=1`
# Each window task asks for half a GPU: a GPU worker runs two at once, one reading and decoding its region on the
# host while the other's windows run on the device (they take turns there: segmentation.inference.device_gate)
GPU_TASK_SHARE = 0.5
INTERRUPTED_CLOSE_S = 15.0  # the longest an interrupted run waits for its local cluster to close
# A LocalCUDACluster worker's threads unless told: its two window tasks, and the host tasks (writing chunks,
# statistics) beside them
GPU_WORKER_THREADS = 4
TORCH_THREADS_ENV = "SEGFLOW_TORCH_THREADS"  # set on a worker to fix torch's intra-op threads there
NUMPY_HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"  # numpy's own switch; segflow's processes default it to "0"
GPUS_NEED_DASK_CUDA = "--gpus needs dask-cuda (pip install dask-cuda)"


class TorchThreads(WorkerPlugin):
    """Set torch's intra-op threads in every worker so that tasks running at once do not oversubscribe cores.

    With ``threads`` given (a local cluster, whose layout segflow chose) every
    worker uses that many.  Without it (an existing cluster, laid out by
    whoever started it) each worker takes its share of its own host: the
    host's cores divided by the threads of all workers the scheduler knows on
    that host, at least one.  ``SEGFLOW_TORCH_THREADS`` in a worker's
    environment overrides both.
    """

    name = "segflow-torch-threads"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    async def setup(self, worker) -> None:  # noqa: ANN001
        import torch

        quiet_reported_failures()  # in a worker process too: its log lines reach the command's console

        threads = _env_threads() or self.threads
        if threads is None:
            try:
                peers = (await worker.scheduler.identity()).get("workers", {})
            except Exception:  # an unreachable scheduler: count this worker alone
                peers = {}
            threads = host_share(available_cores(), worker.state.nthreads,
                                 [w.get("nthreads", 0) for addr, w in peers.items()
                                  if w.get("host") == worker.ip and addr != worker.address])
        torch.set_num_threads(threads)


class IgnoreCtrlC(WorkerPlugin):
    """A local cluster's worker processes ignore SIGINT: a terminal's Ctrl-C goes to the command's whole process
    group, and a worker it killed failed the window tasks of the inputs in flight (``CommClosedError``, then
    ``KilledWorker``) before the command could stop them in order.  The command stops its workers itself (closing
    the cluster), and ``flows/reaper.py`` ends any a killed command leaves.  SIGTERM and SIGKILL still end them."""

    name = "segflow-ignore-ctrl-c"

    async def setup(self, worker) -> None:  # noqa: ANN001
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # a worker process's event loop: its main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _env_threads() -> int | None:
    value = os.environ.get(TORCH_THREADS_ENV, "").strip()
    return max(1, int(value)) if value.isdigit() else None


def host_share(cores: int, own_threads: int, other_threads: list[int]) -> int:
    """torch threads per task for a worker of ``own_threads`` beside workers of ``other_threads`` on one host."""
    return max(1, cores // max(1, own_threads + sum(other_threads)))


def worker_environ() -> dict[str, object]:
    """Dask's pre-spawn environment for worker processes, with glibc malloc tuned for big arrays.

    Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` to return memory to the OS
    eagerly; that also turns off glibc's dynamic mmap threshold, so every large
    tensor or array allocation became a fresh mmap with page faults: inference
    on a worker ran 1.6-2x slower (4096² benchmark). Instead, blocks under
    64 MiB come from the heap and are reused, the heap is trimmed past 128 MiB
    free, and two arenas limit fragmentation across threads (measured: same
    speed, about 90 MB less per worker). OMP/MKL/OpenBLAS stay at one thread:
    torch's thread count is set by :class:`TorchThreads`. numpy's huge-page
    advice is off, as in this process (:func:`numpy_hugepages_off`).
    """
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env.update(MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(128 << 20))
    env[NUMPY_HUGEPAGE_ENV] = os.environ.get(NUMPY_HUGEPAGE_ENV, "0")
    return env


def numpy_hugepages_off() -> bool:
    """Stop numpy advising the kernel to back its large arrays with huge pages, unless the user chose; True if off.

    numpy marks every allocation of 4 MB or more ``MADV_HUGEPAGE``. Where the
    kernel's ``transparent_hugepage/defrag`` is ``madvise`` (a common default)
    and no free huge page is at hand, each first touch of such memory waits
    for the kernel to compact memory into one (numpy/numpy#31590). On this
    project's 2-core machines first-touched numpy memory cost 10 s per GB with
    the advice and 0.4 s without, and segflow's ``fast`` 2D 8192² run of
    ``benchmarks/predict_vs_monai.py`` took 9.45 s against 8.40 s
    (``docs/performance.md``, "Huge pages").
    ``NUMPY_MADVISE_HUGEPAGE=1`` in the environment keeps numpy's default.
    """
    os.environ.setdefault(NUMPY_HUGEPAGE_ENV, "0")
    if os.environ[NUMPY_HUGEPAGE_ENV] != "0":
        return False
    try:  # numpy read the variable when it was imported; its runtime switch (private, numpy >= 1.20)
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return False
    _set_madvise_hugepage(False)
    return True


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2 or v1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpus(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """CPUs a cgroup quota allows (rounded up; ``docker --cpus 2``, a Kubernetes CPU limit), or None if unlimited.

    Affinity alone sees every core of the node inside a container, so a
    worker pod limited to 2 CPUs on a 64-core node would give torch 64 threads.
    """
    root = Path(root)
    try:
        text = (root / "cpu.max").read_text().split()  # v2: "<quota> <period>" or "max <period>"
        quota, period = (None if text[0] == "max" else int(text[0])), int(text[1])
    except (OSError, ValueError, IndexError):
        try:  # v1
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        quota = None if quota <= 0 else quota
    if quota is None or period <= 0:
        return None
    return max(1, -(-quota // period))


def gpu_workers(client: Client) -> int:
    """How many of the client's workers advertise a GPU resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return sum(1 for w in workers.values() if (w.get("resources") or {}).get(GPU, 0) > 0)


def gpu_tasks(client: Client) -> ContextManager[Any]:
    """Annotate the graphs built inside with ``resources={"GPU": GPU_TASK_SHARE}``, when the cluster has GPU workers.

    Wrap the building of the window-evaluating tasks in it (not the compute
    call: annotations are taken when a graph layer is made). On a cluster
    without GPU workers it does nothing: a task asking for a resource no
    worker has would wait forever.
    """
    return dask.annotate(resources={GPU: GPU_TASK_SHARE}) if gpu_workers(client) else nullcontext()


def _quiet() -> None:
    for name in ("distributed", "distributed.batched", "distributed.nanny", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_reported_failures()


class ReportedFailures(logging.Filter):
    """Drops a worker's "Compute Failed" record (a multi-line dump with the task's traceback) when the task's error
    is one segflow reports itself, in one line naming the input: its own errors, an OSError (a full disk, an
    output folder deleted under a run) and an interruption.  Any other error's record stays.

    It also drops the traceback of a heartbeat that a worker had in flight when segflow shut its cluster down
    ("Failed to communicate with scheduler during heartbeat": a race at the end of a run that went well, which
    put a traceback after `segment`'s last line in one CI run); a running worker's failed heartbeat keeps its
    record (:func:`shutdown_in_progress`)."""

    def __init__(self) -> None:
        super().__init__()
        names = error_names() | {"OSError", "FileNotFoundError", "PermissionError", "IsADirectoryError",
                                 "NotADirectoryError", "FileExistsError", "Interrupted", "CancelledError"}
        self.reported = re.compile(r"Exception: ['\"](?:" + "|".join(sorted(map(re.escape, names))) + r")\(")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if text.startswith(HEARTBEAT_FAILED) and shutdown_in_progress():
            return False
        return not ("Compute Failed" in text and self.reported.search(text))


HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
_CLOSING = {Status.closing, Status.closing_gracefully}
_SHUTTING_DOWN = [0]  # clusters this process is closing now (dask_client's exit)


@contextmanager
def shutting_down() -> Iterator[None]:
    """While segflow closes a cluster: its workers' heartbeat errors are the shutdown, not news."""
    _SHUTTING_DOWN[0] += 1
    try:
        yield
    finally:
        _SHUTTING_DOWN[0] -= 1


def closing_a_cluster() -> bool:
    """Whether segflow is closing a cluster of this process now (:func:`dask_client`'s exit)."""
    return _SHUTTING_DOWN[0] > 0


def shutdown_in_progress() -> bool:
    """Whether this process is closing a cluster (its worker may be closed already while the scheduler is not),
    or a Dask worker of it is closing (a worker process closed by its nanny).  Workers closed before do not count:
    an earlier cluster's, kept alive by a reference, had hidden a running worker's failed heartbeat."""
    if closing_a_cluster():
        return True
    return any(worker.status in _CLOSING for worker in list(getattr(Worker, "_instances", ())))


def quiet_reported_failures() -> None:
    """Install :class:`ReportedFailures` on distributed's worker logger, once per process."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, ReportedFailures) for f in logger.filters):
        logger.addFilter(ReportedFailures())


def _connect(address: str, gpus: bool) -> Client:
    try:
        client = Client(address, timeout=dask.config.get("distributed.comm.timeouts.connect"))
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(None, f"cannot reach the Dask scheduler at {address}: {reason}") from None
    if gpus and not gpu_workers(client):
        client.close()
        raise ConfigError(None, f"--gpus: no worker of the Dask scheduler at {address} has a {GPU} resource "
                                f"(start them with `dask cuda worker {address} --nthreads {GPU_WORKER_THREADS} "
                                f"--resources {GPU}=1`)")
    client.register_plugin(TorchThreads())
    return client


def http_options(dashboard: bool) -> dict[str, Any]:
    """A local cluster's scheduler HTTP server on a free port, with or without the dashboard's pages.

    ``dashboard_address=None`` does not turn the server off: it falls back to
    8787 (and warns when that is taken), hence ``:0`` either way.
    """
    return {"dashboard_address": ":0", "scheduler_kwargs": {"dashboard": dashboard}}


def has_bokeh() -> bool:
    """Whether Dask can serve its dashboard here (it needs bokeh; without it the page only says so)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def dashboard_line(client: Client, what: str) -> str:
    """The one line a command prints about its cluster: the scheduler, ``what`` it is, and the dashboard."""
    workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
    address = str(getattr(client.scheduler, "address", "?"))
    where = "in this process" if address.startswith("inproc://") else address  # nothing else can connect to it
    where = f"Dask scheduler {where} ({what}, {workers} worker{'s' * (workers != 1)})"
    services = client.scheduler_info().get("services", {})
    if "dashboard" not in services:
        return f"{where}, no dashboard"
    if not has_bokeh():
        return f"{where}, no dashboard (install bokeh for one)"
    return f"{where}, dashboard {client.dashboard_link}"


# the schedulers each reporter (one per command) has named: the demo's two batches share one and named it twice
_ANNOUNCED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def _announce(client: Client, what: str) -> None:
    from flows.progress import note, reporter

    try:
        address = str(getattr(client.scheduler, "address", ""))
        try:
            named = _ANNOUNCED.setdefault(reporter(), set())
        except TypeError:  # a reporter that takes no weak reference: named every time, as before
            named = set()
        if address in named:
            return
        text = dashboard_line(client, what)
    except Exception:  # noqa: BLE001 - a line about the dashboard must never fail a run
        return
    named.add(address)
    note(text)


def _cuda_cluster(workers: int | None, threads_per_worker: int | None, dashboard: bool) -> LocalCluster:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ConfigError(None, GPUS_NEED_DASK_CUDA) from None
    # one worker process per visible GPU (each sees its GPU as device 0), each advertising GPU=1
    return LocalCUDACluster(n_workers=workers, threads_per_worker=threads_per_worker or GPU_WORKER_THREADS,
                            resources={GPU: 1}, silence_logs=40, **http_options(dashboard))


@contextmanager
def dask_client(address: str | None = None, *, workers: int | None = None, threads_per_worker: int | None = None,
                dashboard: bool = False, gpus: bool = False, in_process: bool = False) -> Iterator[Client]:
    """Yield a client: to ``address``, else the process's current one, else a new local cluster.

    A local cluster defaults to one worker process with one thread per core,
    each thread's torch single-threaded. Measured at 4096² (441 windows of
    256², 2 cores; benchmarks/predict_vs_monai.py --only-segflow): 1 worker x 2
    threads ran exact/fast in 3.59/2.53 s, 2 workers x 1 thread in 3.82/2.56 s,
    and 1 worker x 1 thread with 2 torch threads in 4.27/3.19 s. One process also
    holds one copy of torch and the model instead of one per core. ``workers``
    asks for more processes (the cores are shared out between them).

    ``gpus`` starts dask-cuda's ``LocalCUDACluster`` instead: one worker per
    GPU (``workers`` of them at most), each with a ``GPU`` resource that
    :func:`gpu_tasks` annotates tasks with (half of it each, so that one
    window task reads its region while another's windows run on the device),
    and :data:`GPU_WORKER_THREADS` threads. With ``address`` it only checks
    that the scheduler has GPU workers. Either way every worker gets the
    :class:`TorchThreads` plugin; the model is one graph key, unpickled once
    per worker.

    ``in_process`` (or ``workers=0``): the local cluster's one worker is
    threads of this process, not a process of its own. A one-off ``segflow
    segment`` runs so by default: a worker process starts Python, imports
    torch and MONAI and loads the model a second time, which was most of a
    small run's start-up (512² with the demo's model: 5.0 s beyond the
    compute with a worker process, 3.7 s without; benchmarks/startup.py).
    Its windows run at the same speed (6144², inference 7.8-8.0 s either
    way). A worker process isolates the work from this process (a crash
    there is restarted by its nanny); ``nightly`` keeps one by default.

    ``dashboard``: serve Dask's dashboard pages, and say once which
    scheduler and where its dashboard is (a line on the CLI's console through
    :func:`flows.progress.note`).  Either way a local cluster's scheduler binds
    a free port, never 8787.
    """
    # distributed keeps the last 1,000 messages under 1 MB of every batched comm, for developers: each input's
    # graph holds the pickled network (0.88 MB for the demo's), so a nightly run's process grew about 1 MB per
    # input, to 1.2 GB after 500 tiny inputs; kept for nobody, it is off (set before any client or worker exists)
    dask.config.set({"distributed.admin.low-level-log-length": 0})
    if address:
        client = _connect(address, gpus)
        try:
            if dashboard:
                _announce(client, "given")
            yield client
        finally:
            client.close()
        return
    if not gpus:
        try:
            from distributed import get_client

            existing = get_client()
        except ValueError:
            existing = None
        if existing is not None and workers is None:
            if dashboard:
                _announce(existing, "this process's client")
            yield existing
            return
    _quiet()
    numpy_hugepages_off()  # before the in-process worker's threads (or the client) allocate anything big
    # set for the process, not a block: a worker restarted after a crash is spawned later
    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
    # the worker's statistical profiler (every thread's stack, every 10 ms) feeds only the dashboard's profile page:
    # without the dashboard it is 1 % of a run's CPU (py-spy, a model-space run at 8192²) spent for nothing
    dask.config.set({"distributed.worker.profile.enabled": dashboard})
    if gpus:
        cluster = _cuda_cluster(workers, threads_per_worker, dashboard)
        plugin = TorchThreads()
    else:
        cores = available_cores()
        in_process = in_process or workers == 0
        n = 1 if in_process else (workers or 1)
        threads = threads_per_worker or max(1, cores // n)
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=not in_process, silence_logs=40,
                               **http_options(dashboard))
        plugin = TorchThreads(max(1, cores // (n * threads)))
    client = Client(cluster)
    try:
        client.register_plugin(plugin)
        if gpus or not in_process:  # worker processes of our own (not threads of this process)
            client.register_plugin(IgnoreCtrlC())
        if dashboard:
            _announce(client, "local cluster")
        yield client
    finally:
        with shutting_down():
            _close(client, cluster)


def _close(client: Client, cluster: Any) -> None:
    """Close the client, then the cluster.  After an interruption (a second SIGTERM to the whole process group)
    the worker processes may be dying, or restarting under their nannies, and a close that waited on them had
    hung for good (1 run of 3 in a probe): it is bounded then, and the watchdog (flows/reaper.py) ends whatever
    is left once the command exits."""
    from flows.interrupts import interrupted

    if interrupted() is None:
        client.close()
        cluster.close()
        return
    try:
        client.close(timeout=INTERRUPTED_CLOSE_S)
        cluster.close(timeout=INTERRUPTED_CLOSE_S)
    except Exception as exc:  # noqa: BLE001 - a timeout, or a comm error of workers already gone
        logging.getLogger(__name__).debug("the interrupted run's cluster did not close in %s s: %s",
                                          INTERRUPTED_CLOSE_S, exc)
