"""`segflow segment --dask-address`: a real `dask scheduler` and two `dask worker` processes on loopback.

The batch run through them must give exactly the labels a run on the default
local cluster gives, with window work done on both remote workers, and the
remote workers must get segflow's TorchThreads plugin.  Also: the ``--gpus``
path without dask-cuda, and the GPU resource annotation on a cluster whose
workers advertise a ``GPU`` resource (an abstract counter: no GPU needed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
SEGFLOW = [sys.executable, "-m", "flows"]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "COLUMNS": "200"}


def _stop(procs: list[subprocess.Popen]) -> None:
    """Workers first (their nannies end the worker processes), then the scheduler; escalate on timeout."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def remote_cluster(tmp_path_factory):
    """`dask scheduler` + 2 × `dask worker --nworkers 1 --nthreads 1` on 127.0.0.1; yields (address, client)."""
    from distributed import Client

    if not DASK.exists():
        pytest.skip(f"{DASK} (the dask command of this environment) is absent")
    tmp = tmp_path_factory.mktemp("dask")
    sched_file = tmp / "scheduler.json"
    env = _env()
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], log_name: str) -> None:
        log = open(tmp / log_name, "wb")
        logs.append(log)
        procs.append(subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=tmp, start_new_session=True))

    client = None
    try:
        start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
               "--scheduler-file", str(sched_file)], "scheduler.log")
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail(f"dask scheduler did not start: {(tmp / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in (1, 2):
            start(["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                   "--name", f"remote-{i}", "--local-directory", str(tmp / f"w{i}")], f"worker{i}.log")
        client = Client(address, timeout="30s")
        client.wait_for_workers(2, timeout=120)
        yield address, client
    finally:
        if client is not None:
            client.close()
        _stop(procs[1:] + procs[:1])
        for log in logs:
            log.close()


def _scene(path: Path, seed: int, shape=(160, 200)) -> Path:
    data = np.random.default_rng(seed).integers(1, 255, (3, *shape), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0], count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    return path


def _segment(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGFLOW, "segment", *map(str, args)], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, cwd=cwd, timeout=400)


def _executed(dask_worker) -> dict[str, float]:  # noqa: ANN001
    """Per task prefix, the seconds of thread time this worker spent executing it (the worker's own metrics)."""
    done: dict[str, float] = {}
    for key, value in dask_worker.digests_total.items():
        # ("execute", [span id,] task prefix, activity, "seconds")
        if isinstance(key, tuple) and len(key) >= 4 and key[0] == "execute" and key[-1] == "seconds":
            done[key[-3]] = done.get(key[-3], 0.0) + value
    return done


def _name_devices_as(name: str | None) -> None:
    """In a worker: ``flows.infer.device_name`` answers ``name`` (None: its own answer again)."""
    import flows.infer

    real = getattr(flows.infer, "_real_device_name", flows.infer.device_name)
    flows.infer._real_device_name = real
    flows.infer.device_name = real if name is None else (lambda device: name)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.mark.slow
def test_segment_through_an_existing_scheduler_matches_a_local_cluster(remote_cluster, tmp_path):
    from flows.cluster import TorchThreads, available_cores, host_share

    address, client = remote_cluster
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    inputs = [_scene(tmp_path / "a.tif", 1), _scene(tmp_path / "b.tif", 2)]
    before = client.run(_executed)
    # the remote workers name their device as a GPU worker would (their module's function, looked up by name when
    # the client sends it): the provenance must record theirs, not this client's "cpu (...)"
    client.run(_name_devices_as, "cuda:0 (a worker's GPU)")

    # the scheduler named the way Dask's own Client() reads it (as infra/'s containers do), and a relative
    # --out: the workers run in another folder (the fixture's), where a relative path had named nothing
    try:
        remote = _segment(*inputs, "--model", model.path, "--out", "remote", "--chunk-size", 64, "--no-zarr",
                          cwd=tmp_path, env={"DASK_SCHEDULER_ADDRESS": address})
    finally:
        client.run(_name_devices_as, None)
    assert remote.returncode == 0, remote.stderr
    assert f"Dask scheduler {address}" in remote.stderr, remote.stderr
    local = _segment(*inputs, "--model", model.path, "--out", tmp_path / "local", "--chunk-size", 64, "--no-zarr")
    assert local.returncode == 0, local.stderr

    for src in inputs:
        with rasterio.open(tmp_path / "remote" / src.name) as r, rasterio.open(tmp_path / "local" / src.name) as loc:
            assert r.transform == loc.transform and r.crs == loc.crs
            assert np.array_equal(r.read(1), loc.read(1))
        record = json.loads((tmp_path / "remote" / f"{src.stem}.provenance.json").read_text())
        assert record["statistics"]["windows_evaluated"] == record["statistics"]["windows_total"] > 1
        assert record["environment"]["device"] == "cuda:0 (a worker's GPU)"
        assert record["environment"]["dask_scheduler"] == address
        local_record = json.loads((tmp_path / "local" / f"{src.stem}.provenance.json").read_text())
        assert local_record["environment"]["device"].startswith("cpu")
        assert "dask_scheduler" not in local_record["environment"]

    # both remote workers evaluated windows: their own execution metrics grew for the evaluate tasks
    after = client.run(_executed)
    assert len(after) == 2
    for addr, done in after.items():
        grew = {p for p, s in done.items() if s > before.get(addr, {}).get(p, 0.0)}
        assert any("evaluate" in p for p in grew), (addr, sorted(grew))

    # segflow registered its torch-threads plugin on the scheduler; each worker took its share of the host
    plugins = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.worker_plugins))
    assert TorchThreads.name in plugins
    threads = client.run(_torch_threads)
    assert set(threads.values()) == {host_share(available_cores(), 1, [1])}


@pytest.mark.slow
def test_unreachable_scheduler_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    src = _scene(tmp_path / "a.tif", 1, shape=(64, 64))
    env_timeout = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    proc = subprocess.run([*SEGFLOW, "segment", str(src), "--model", str(model.path), "--out", str(tmp_path / "o"),
                           "--dask-address", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True,
                          env={**_env(), **env_timeout}, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], proc.stderr


def test_gpus_without_dask_cuda_is_a_clear_error(monkeypatch):
    from flows.cluster import GPUS_NEED_DASK_CUDA, dask_client
    from storage.errors import ConfigError

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails, whether or not it is installed
    with pytest.raises(ConfigError, match=r"--gpus needs dask-cuda \(pip install dask-cuda\)"):
        with dask_client(gpus=True):
            pass
    assert str(ConfigError(None, GPUS_NEED_DASK_CUDA)) == "--gpus needs dask-cuda (pip install dask-cuda)"


def test_host_share():
    from flows.cluster import host_share

    assert host_share(16, 1, []) == 16
    assert host_share(16, 2, [2, 4]) == 2
    assert host_share(2, 1, [1, 1, 1]) == 1


def test_cgroup_cpu_quota(tmp_path):
    from flows.cluster import cgroup_cpus

    assert cgroup_cpus(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cgroup_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpus(tmp_path) == 4


def test_gpu_tasks_annotate_window_work_only_on_gpu_clusters(tmp_path):
    """Graphs built inside ``gpu_tasks`` reach the scheduler with GPU restrictions, only where workers have GPUs;
    each window task asks for a share of a GPU, so a one-GPU worker runs two at once (one reads while the other
    runs on the device) and never more."""
    import dask
    import zarr
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

    from flows.cluster import GPU, GPU_TASK_SHARE, gpu_tasks, gpu_workers
    from segmentation import build_plan

    class Restrictions(SchedulerPlugin):
        def __init__(self, scheduler) -> None:  # noqa: ANN001
            self.scheduler, self.seen = scheduler, {}

        def transition(self, key, start, finish, *args, **kwargs) -> None:  # noqa: ANN001
            if finish == "processing":
                self.seen[str(key)] = dict(self.scheduler.tasks[key].resource_restrictions or {})

    class Executing(WorkerPlugin):
        """The most window tasks the worker ran at once (its own state machine: the scheduler hands it more)."""

        name = "segflow-test-executing"

        def __init__(self) -> None:
            self.running, self.most = set(), 0

        def transition(self, key, start, finish, **kwargs) -> None:  # noqa: ANN001
            if "evaluate" in str(key):
                (self.running.add if finish == "executing" else self.running.discard)(key)
                self.most = max(self.most, len(self.running))

    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=3)
    image = np.random.default_rng(0).random((3, 128, 128), dtype=np.float32)
    results = {}
    for resources in ({GPU: 1}, None):
        with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=":0",
                          resources=resources) as cluster, Client(cluster) as client:
            assert gpu_workers(client) == (1 if resources else 0)
            seen = Restrictions(cluster.scheduler)
            cluster.scheduler.add_plugin(seen)
            executing = Executing()
            client.register_plugin(executing)
            executing = next(iter(cluster.workers.values())).plugins[executing.name]  # the worker's (in-process) copy
            with gpu_tasks(client):
                plan = build_plan(image, model, chunks=64)
            target = zarr.create_array(store=str(tmp_path / f"l{bool(resources)}.zarr"), shape=(128, 128),
                                       chunks=(64, 64), dtype="uint8")
            client.gather(client.compute(plan.writes(target)))
            results[bool(resources)] = (seen.seen, target[:], executing.most)
    gpu_seen, gpu_labels, gpu_most = results[True]
    cpu_seen, cpu_labels, _ = results[False]
    evaluate = [k for k in gpu_seen if "evaluate" in k]
    assert len(evaluate) == 4 and all(gpu_seen[k] == {GPU: GPU_TASK_SHARE} for k in evaluate)
    assert gpu_most == 2  # two at once on one GPU, though the worker has three threads
    assert not any(cpu_seen.values())  # no GPU workers: nothing restricted (else it would wait forever)
    assert np.array_equal(gpu_labels, cpu_labels)
    assert dask.get_annotations() == {}
