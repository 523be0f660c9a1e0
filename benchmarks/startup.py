"""Start-up overhead of a one-input `segflow segment` run: end to end, and where the time goes.

    .venv/bin/python benchmarks/startup.py [--repeat 3] [--no-server] [--try-overlap] [--record startup]

Makes a tiny GeoTIFF (3 × 64², one 64² window) and a tiny random-weight U-Net
in a temporary folder, so that the work itself is negligible, then:

* **end to end**: wall time of `python -m flows segment tiny.tif --model M
  --out O` in a fresh process, the way a user runs it with nothing else
  running (Prefect's temporary server, a local Dask cluster, torch).  The
  first run uses a new Prefect home (the temporary server creates its SQLite
  database); the next ``--repeat`` runs reuse it, as a user's runs do.  The
  median of those is the figure.  Then the same against a running
  ``prefect server start`` (``PREFECT_API_URL`` set), unless ``--no-server``.
* **phases**: a fresh process does what the command does, with timestamps:
  interpreter start, ``import torch``, the CLI module, the flow module
  (Prefect, Dask, segmentation), the model check, then the real
  ``segment_batch`` flow with its steps wrapped to time them: Prefect's
  temporary server and flow-run start (until the flow body runs), loading the
  model, starting the LocalCluster (its worker imports torch), the work
  (ingest, inference, export), closing the cluster, and finishing the flow
  run.  Same Prefect home as the warm runs.
* ``--try-overlap``: the same steps with the temporary server started in a
  background thread at process start and the Dask cluster started meanwhile.

A ``PREFECT_API_URL`` in the caller's environment is ignored, except in the
runs that start their own server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

_T0 = time.time()  # this process's first line (after the standard library): the end of interpreter start

PHASES = [
    ("interpreter", "Python interpreter start (to the first line of the script)"),
    ("import_torch", "`import torch`"),
    ("import_cli", "`import flows.cli` (typer, rich, pydantic)"),
    ("import_flows", "`import flows.flows` (Prefect, Dask, distributed, segmentation)"),
    ("check_model", "model check (card, weights hash)"),
    ("prefect_start", "Prefect temporary server + flow run start"),
    ("load_model", "load the model"),
    ("cluster_start", "Dask LocalCluster start (1 worker process; it imports torch to set its threads)"),
    ("work", "the work: ingest, inference, export (64², 1 window)"),
    ("cluster_close", "Dask LocalCluster shutdown"),
    ("prefect_finish", "flow run end"),
]


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    path = env.get("PYTHONPATH")
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
               COLUMNS="200")
    return env


def make_inputs(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import rasterio
    import torch
    from rasterio.transform import from_origin

    from segmentation.card import ModelCard
    from segmentation.modeldir import build_module, save_model

    tif = folder / "tiny.tif"
    data = np.random.default_rng(0).integers(1, 255, (3, 64, 64), dtype=np.uint8)
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    card = ModelCard.model_validate({
        "name": "tiny-startup", "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2],
                                                                             "num_res_units": 0}},
        "input": {"spatial_dims": 2, "channels": 3, "normalization": {"mode": "image_zscore"}},
        "classes": [{"value": v, "name": f"c{v}", "color": [60 * v, 200, 100]} for v in range(3)],
        "inference": {"roi": [64, 64], "overlap": 0.25, "batch_size": 4}})
    torch.manual_seed(0)
    model = save_model(folder / "model", card, build_module(card)).path
    return tif, model


def end_to_end(tif: Path, model: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of `python -m flows segment`, the provenance's total_seconds: the work itself)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(tif), "--model", str(model),
                           "--out", str(out), "--no-zarr"], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"segflow segment failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "tiny.provenance.json").read_text())
    return wall, record["statistics"]["total_seconds"]


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A `prefect server start` process on a free loopback port (SQLite in ``home``); yields its API URL."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    env = {**_env(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                             "127.0.0.1", "--port", str(port), "--no-ui"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("prefect server start did not come up")
            time.sleep(0.3)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def phases(mode: str, tif: Path, model: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, str(tif), str(model),
                           str(out), str(started)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"phase run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _start_prefect_server() -> None:
    """What Prefect does on its first API call without PREFECT_API_URL: start the temporary server (blocks)."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


def child(mode: str, tif: str, model: str, out: str, parent_started: float) -> None:
    """Runs in a fresh process: the command's steps, timed (printed as one JSON line).

    ``sequential``: as `segflow segment` does them today.  ``overlap``: the
    proposal -- the temporary Prefect server starts in a background thread
    (its work is in a subprocess) at once, and the Dask cluster is started
    before the flow, which reuses it, while the server comes up.
    """
    result = {"interpreter": _T0 - parent_started}
    t = t_start = time.perf_counter()
    server = None
    if mode == "overlap":
        import threading

        server = threading.Thread(target=_start_prefect_server, daemon=True)
        server.start()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        result[name] = result.get(name, 0.0) + now - t
        t = now

    import torch  # noqa: F401

    lap("import_torch")
    import flows.cli  # noqa: F401

    lap("import_cli")
    import flows.flows as ff

    lap("import_flows")
    from flows.config import SegmentOptions
    from segmentation.modeldir import check_model

    check_model(Path(model))
    lap("check_model")

    real_load, real_client = ff.load_model, ff.dask_client

    def load_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        lap("prefect_start")
        loaded = real_load(*args, **kwargs)
        lap("load_model")
        return loaded

    @contextmanager
    def dask_client(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with real_client(*args, **kwargs) as client:
            lap("cluster_start")
            yield client
            lap("work")
        lap("cluster_close")

    options = SegmentOptions(keep_zarr=False)
    if mode == "overlap":
        with real_client(options.dask_address, workers=options.workers):  # the flow's dask_client reuses it
            lap("cluster_start")
            server.join()
            lap("prefect_start")
            state = ff.segment_batch(inputs=[tif], model_dir=model, out_dir=out, options=options,
                                     return_state=True)
            lap("work")
        lap("cluster_close")
    else:
        ff.load_model, ff.dask_client = load_model, dask_client
        state = ff.segment_batch(inputs=[tif], model_dir=model, out_dir=out, options=options, return_state=True)
        lap("prefect_finish")
        ff.load_model, ff.dask_client = real_load, real_client
    outcomes = ff.batch_outcomes(state)
    assert outcomes[0]["ok"], outcomes
    result["total"] = result["interpreter"] + time.perf_counter() - t_start
    print(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="warm end-to-end runs (median reported)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--no-server", action="store_true",
                    help="skip the runs against a running `prefect server start`")
    ap.add_argument("--try-overlap", action="store_true",
                    help="also time starting the temporary server in a background thread while the Dask "
                         "cluster starts (it did not help on 2 cores)")
    report.add_argument(ap)
    args = ap.parse_args()
    if args.child:
        mode, tif, model, out, started = args.child
        child(mode, tif, model, out, float(started))
        return 0
    with tempfile.TemporaryDirectory(prefix="segflow-startup-") as tmp:
        tmp = Path(tmp)
        tif, model = make_inputs(tmp)
        env = _env(tmp / "prefect-home")
        cold, cold_work = end_to_end(tif, model, tmp / "out-cold", env)
        warm = [end_to_end(tif, model, tmp / f"out-{i}", env) for i in range(args.repeat)]
        parts = phases("sequential", tif, model, tmp / "out-phases", env)
        served = []
        if not args.no_server:
            with prefect_server(tmp / "server-home") as api:
                served = [end_to_end(tif, model, tmp / f"out-server-{i}", {**env, "PREFECT_API_URL": api})[0]
                          for i in range(args.repeat)]
        overlapped, sequential = [], []
        if args.try_overlap:
            overlapped = [phases("overlap", tif, model, tmp / f"out-overlap-{i}", env)["total"]
                          for i in range(args.repeat)]
            sequential = [phases("sequential", tif, model, tmp / f"out-seq-{i}", env)["total"]
                          for i in range(args.repeat - 1)] + [parts["total"]]
    walls = [w for w, _ in warm]
    median = statistics.median(walls)
    work = statistics.median(w for _, w in warm)
    total = parts.pop("total")
    lines = [
        f"One-input `segflow segment` of a 3 × 64² GeoTIFF with a tiny U-Net (1 window): what is left is start-up. "
        f"{os.cpu_count()} cores; no Prefect server running (the command starts its temporary one).", "",
        "| end to end (`python -m flows segment`, fresh process) | seconds |", "|---|---|",
        f"| first run, new Prefect home (creates its database) | {cold:.1f} |",
        f"| warm runs: median of {len(walls)} (min {min(walls):.1f}, max {max(walls):.1f}) | **{median:.1f}** |",
        f"| of which the work itself (provenance `total_seconds`, median) | {work:.2f} |", "",
        "| phase (one fresh process, the same steps, timed) | seconds | share |", "|---|---|---|",
    ]
    for key, label in PHASES:
        lines.append(f"| {label} | {parts.get(key, 0.0):.2f} | {100 * parts.get(key, 0.0) / total:.0f} % |")
    lines.append(f"| **total** (to the end of the flow run; exit not included) | **{total:.2f}** | |")
    lines.append(f"| process exit (temporary server stop, interpreter teardown): warm end to end − total "
                 f"| ≈ {max(0.0, median - total):.1f} | |")
    if served:
        lines[7:7] = [f"| warm runs against a running `prefect server start` (PREFECT_API_URL set): median of "
                      f"{len(served)} (min {min(served):.1f}, max {max(served):.1f}) "
                      f"| **{statistics.median(served):.1f}** |"]
    if overlapped:
        lines += ["", "| overlapping start-up (same steps in one process, timed; median of "
                  f"{len(overlapped)}) | seconds |", "|---|---|",
                  f"| as today: temporary Prefect server started by the flow, cluster inside the flow "
                  f"| {statistics.median(sequential):.2f} |",
                  f"| temporary server started in a background thread at process start; Dask cluster started "
                  f"meanwhile and reused by the flow | {statistics.median(overlapped):.2f} |"]
    body = "\n".join(lines)
    print(body)
    if args.record:
        report.record(args.record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
