"""Start-up overhead of a one-input `segflow segment` run: end to end against its compute, and where the time goes.

    .venv/bin/python benchmarks/startup.py [--repeat 3] [--no-server] [--without-test-extras] [--record startup]

Issue 12's set-up: the demo's land-cover model architecture
(``segmentation.demo_cards.landcover_card``: a 4-level U-Net, ROI 128²) with
*random* weights (the timing does not depend on them), and a 512² 4-band
uint16 GeoTIFF made by the demo's own scene generator, in a temporary folder.

* **end to end**: wall time of `python -m flows segment scene.tif --model M
  --out O --no-zarr` in a fresh process, against the input's compute (the
  provenance's ``statistics.total_seconds``: ingest, inference, export).  The
  overhead is wall − compute, per run; the median of ``--repeat`` warm runs is
  the figure (a first, cold run comes before them and is shown apart; the
  warm runs of the ways below are interleaved, the server's apart).  Ways:

  - no Prefect API configured, the default: the flow's body without Prefect
    (``flows.batch.segment_inputs``; the run must leave no Prefect database);
  - ``--prefect`` with no API: Prefect's temporary server and a flow run;
  - ``--without-test-extras``: the default with pytorch-ignite and
    scikit-image unimportable in every process (a ``sitecustomize`` on
    ``PYTHONPATH``), as in an install without segflow's test extras: MONAI
    imports them whenever they are installed;
  - against a running ``prefect server start`` (``PREFECT_API_URL`` set),
    unless ``--no-server``.

* **phases**: a fresh process per way does what the command does, in its
  order, with timestamps: imports, the model check, the flow run's start
  (Prefect only), loading the model, the cluster's start (in a thread, beside
  the check and the load), the work, the cluster's shutdown, the flow run's
  end, and then the process's exit (from its last line to its end, as seen by
  this script).

A ``PREFECT_API_URL`` in the caller's environment is ignored, except in the
runs against the started server.  The machine's load average is printed with
the figures: on a busy machine every figure grows.
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

SIZE = 512
TARGET_S = 5.0  # issue 12: at most this much beyond the compute
NO_EXTRAS = ("ignite", "skimage")  # pytorch-ignite, scikit-image: segflow's test extras only
MODES = ("plain", "process", "prefect")  # the phase table's columns
PHASES = [
    ("interpreter", "Python interpreter start (to the first line of the script)"),
    ("import_cli", "`import flows.cli` (typer, rich, pydantic)"),
    ("import_batch", "`import flows.batch` (Dask, distributed)"),
    ("import_prefect", "`import flows.flows` (Prefect, torch, the pipeline; `--prefect` only)"),
    ("check_model", "model check (card, weights hash; without Prefect this imports torch, beside the cluster's start)"),
    ("pipeline_imports", "the pipeline's imports (zarr, rasterio, ...; with Prefect already done)"),
    ("flow_start", "Prefect's temporary server and flow-run start"),
    ("load_model", "load the model (imports MONAI)"),
    ("cluster_start", "cluster start, in a thread beside the above: the LocalCluster (by default threads of this "
                      "process; with `--workers 1` a worker process, which imports torch, and its own load of the "
                      "model)"),
    ("cluster_process", "… of which the LocalCluster up (its scheduler; with `--workers 1` the worker process)"),
    ("cluster_wait", "… of which waited for after this process had loaded the model"),
    ("work", f"the work: ingest, inference, export ({SIZE}², the compute)"),
    ("cluster_close", "Dask LocalCluster shutdown (its worker's objects frozen out of the GC first)"),
    ("flow_finish", "run end (Prefect: the flow run's end)"),
]


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    path = env.get("PYTHONPATH")
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
               COLUMNS="200")
    return env


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """The demo's scene generator at 512², and the demo's land-cover architecture with random weights."""
    import torch

    from segmentation.demo_cards import landcover_card
    from segmentation.modeldir import build_module, save_model
    from storage.samples import make_scene

    scene, _ = make_scene(folder / "scene.tif", size=(SIZE, SIZE), seed=7)
    card = landcover_card().model_copy(update={"name": "landcover-2d-random"})
    torch.manual_seed(0)
    return scene, save_model(folder / "model", card, build_module(card)).path


def end_to_end(scene: Path, model: Path, out: Path, env: dict[str, str], *extra: str) -> tuple[float, float]:
    """(wall seconds of `python -m flows segment`, the provenance's total_seconds: the compute)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model),
                           "--out", str(out), "--no-zarr", *extra], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"segflow segment failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / f"{scene.stem}.provenance.json").read_text())
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


def phases(mode: str, scene: Path, model: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, str(scene), str(model),
                           str(out), str(started)], capture_output=True, text=True, env=env, cwd=ROOT)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"phase run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["exit"] = ended - result.pop("end_wall")  # from the result's line to the process's end
    return result


def child(mode: str, scene: str, model: str, out: str, parent_started: float) -> None:
    """Runs in a fresh process: the command's steps in its order, timed (printed as one JSON line).

    ``plain``: the flow's body without Prefect (the default without a Prefect
    API): the cluster starts in a thread first, then the model check and the
    body; ``process``: the same with ``--workers 1`` (a worker process, the
    default before segment's cluster ran in its own process); ``prefect``: the ``segment-batch`` flow run (temporary server),
    whose body starts the cluster.  The cluster's start runs beside the
    model's check and load, so it is timed on its own, and ``cluster_wait`` is
    what the run waited for it after the model had loaded.
    """
    import importlib
    import threading

    at: dict[str, float] = {}
    lock = threading.Lock()

    def mark(name: str) -> None:
        with lock:
            at.setdefault(name, time.perf_counter())

    t_start = time.perf_counter()
    mark("start")
    importlib.import_module("flows.cli")
    mark("import_cli")
    fb = importlib.import_module("flows.batch")
    mark("import_batch")
    if mode == "prefect":
        ff = importlib.import_module("flows.flows")
    mark("import_prefect")
    from flows.config import SegmentOptions

    real_client, real_batch_client = fb.dask_client, fb.batch_client

    def load_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        mark("load_start")
        loaded = real_load(*args, **kwargs)
        mark("load_end")
        return loaded

    @contextmanager
    def dask_client(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with real_client(*args, **kwargs) as client:
            mark("cluster_up")
            yield client

    @contextmanager
    def batch_client(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        mark("cluster_start")
        with real_batch_client(*args, **kwargs) as client:
            mark("cluster_ready")
            yield client
            mark("close_start")
        mark("close_end")

    def segment_staged(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        mark("work_start")
        outcome = real_staged(*args, **kwargs)
        mark("work_end")
        return outcome

    def patch() -> None:  # after the model check, which imports segmentation as the command does
        nonlocal real_load, real_staged
        mark("check_model")
        import flows.staging
        import segmentation

        real_load, real_staged = segmentation.load_model, flows.staging.segment_staged
        segmentation.load_model, flows.staging.segment_staged = load_model, segment_staged
        mark("flow_call")

    real_load = real_staged = None
    fb.dask_client, fb.batch_client = dask_client, batch_client
    options = SegmentOptions(keep_zarr=False, workers=1 if mode == "process" else None)
    if mode == "prefect":
        from segmentation.modeldir import check_model

        check_model(Path(model))
        patch()
        outcomes = ff.batch_outcomes(ff.segment_batch(inputs=[scene], model_dir=model, out_dir=out,
                                                      options=options, return_state=True))
    else:
        with fb.start_cluster(model, options) as cluster:  # as flows/segment_cli.py does
            from segmentation.modeldir import check_model

            check_model(Path(model))
            patch()
            outcomes = fb.segment_inputs(inputs=[scene], model_dir=model, out_dir=out, options=options,
                                         cluster=cluster)
    mark("flow_end")
    assert outcomes[0]["ok"], outcomes
    if os.environ.get("SEGFLOW_STARTUP_MARKS"):
        print({k: round(v - at["start"], 2) for k, v in sorted(at.items(), key=lambda kv: kv[1])}, file=sys.stderr)

    def span(a: str, b: str) -> float:
        return max(0.0, at[b] - at[a])

    result = {"interpreter": _T0 - parent_started, "import_cli": span("start", "import_cli"),
              "import_batch": span("import_cli", "import_batch"),
              "import_prefect": span("import_batch", "import_prefect"),
              "check_model": span("import_prefect", "check_model"),
              "pipeline_imports": span("check_model", "flow_call"),
              "flow_start": span("flow_call", "load_start"), "load_model": span("load_start", "load_end"),
              "cluster_start": span("cluster_start", "cluster_ready"),
              "cluster_process": span("cluster_start", "cluster_up"),
              "cluster_wait": max(0.0, at["cluster_ready"] - max(at["load_end"], at["cluster_start"])),
              "work": span("work_start", "work_end"), "cluster_close": span("close_start", "close_end"),
              "flow_finish": span("close_end", "flow_end")}
    result["total"] = result["interpreter"] + time.perf_counter() - t_start
    result["end_wall"] = time.time()
    print(json.dumps(result), flush=True)
    import gc

    gc.freeze()  # as the command ends (flows.cliutil.finish)


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process and its waited-for descendants)."""
    import resource

    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait; guest time is in user
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own


def _row(label: str, runs: list[tuple[float, float]]) -> str:
    walls = [w for w, _ in runs]
    work = statistics.median(c for _, c in runs)
    over = [w - c for w, c in runs]
    return (f"| {label} | {statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) | {work:.2f} "
            f"| **{statistics.median(over):.1f}** ({min(over):.1f}–{max(over):.1f}) |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="warm end-to-end runs per way (median reported)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--no-server", action="store_true",
                    help="skip the runs against a running `prefect server start`")
    ap.add_argument("--without-test-extras", action="store_true",
                    help="also time the default way with pytorch-ignite and scikit-image unimportable in every "
                         "process, as in an install without segflow's test extras (MONAI imports them if present)")
    report.add_argument(ap)
    args = ap.parse_args()
    if args.child:
        mode, scene, model, out, started = args.child
        child(mode, scene, model, out, float(started))
        return 0
    load_before, cpu_before, t_before = os.getloadavg(), _cpu_seconds(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="segflow-startup-") as tmp:
        tmp = Path(tmp)
        scene, model = make_inputs(tmp)
        home = tmp / "prefect-home"
        env = _env(home)
        runs: dict[str, list[tuple[float, float]]] = {}
        cold: dict[str, tuple[float, float]] = {}
        # the default first, on a fresh Prefect home: it must not start Prefect's temporary server
        cold["plain"] = end_to_end(scene, model, tmp / "out-plain-cold", env)
        if (home / "prefect.db").exists():
            raise SystemExit("the default run without a Prefect API made a Prefect database: it used Prefect")
        cold["prefect"] = end_to_end(scene, model, tmp / "out-prefect-cold", env, "--prefect")
        ways = {"plain": (env, ()), "process": (env, ("--workers", "1")), "prefect": (env, ("--prefect",))}
        if args.without_test_extras:
            site = tmp / "no-test-extras"
            site.mkdir()
            (site / "sitecustomize.py").write_text(f"import sys\nfor name in {NO_EXTRAS!r}:\n"
                                                   "    sys.modules[name] = None\n")
            ways["bare"] = ({**env, "PYTHONPATH": f"{site}{os.pathsep}{env['PYTHONPATH']}"}, ())  # workers inherit it
        for i in range(args.repeat):  # the ways interleaved, so that a change in the machine's load hits them alike
            for way, (way_env, flags) in ways.items():
                runs.setdefault(way, []).append(end_to_end(scene, model, tmp / f"out-{way}-{i}", way_env, *flags))
        parts = {mode: phases(mode, scene, model, tmp / f"out-phases-{mode}", env)
                 for mode in ("plain", "process", "prefect")}
        if not args.no_server:
            with prefect_server(tmp / "server-home") as api:
                served = {**env, "PREFECT_API_URL": api}  # the default: a flow run, reported to the server
                runs["server"] = [end_to_end(scene, model, tmp / f"out-server-{i}", served)
                                  for i in range(args.repeat)]
    load_after, cpu_after, elapsed = os.getloadavg(), _cpu_seconds(), time.monotonic() - t_before
    others = ""
    if cpu_before and cpu_after:  # the machine's busy CPU time that was not this benchmark's processes'
        other = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
        others = (f"; other processes used {other:.0f} CPU-seconds during its {elapsed:.0f} s "
                  f"({100 * other / (elapsed * (os.cpu_count() or 1)):.0f} % of the machine)")
    plain_over = statistics.median(w - c for w, c in runs["plain"])
    lines = [
        f"One-input `segflow segment` of a {SIZE}² 4-band uint16 GeoTIFF (the demo's scene generator) with the "
        f"demo's land-cover U-Net architecture and random weights (the timing does not depend on them). "
        f"{os.cpu_count()} cores; 1-minute load average {load_before[0]:.1f} before the benchmark, "
        f"{load_after[0]:.1f} after (its own runs included){others}.",
        "",
        f"| end to end (`python -m flows segment`, fresh process; median of {args.repeat} warm runs, range) "
        "| wall s | compute s (provenance `total_seconds`) | wall − compute s |",
        "|---|---|---|---|",
        _row("no Prefect API configured (default): the flow's body without Prefect", runs["plain"]),
        _row("`--workers 1`: the same with one worker process (segment's default before; nightly's default)",
             runs["process"]),
        _row("`--prefect` without an API: Prefect's temporary server + flow run", runs["prefect"]),
    ]
    if "bare" in runs:
        lines.append(_row(f"default, with {' and '.join(NO_EXTRAS)} unimportable (an install without the test "
                          f"extras; MONAI imports them when present)", runs["bare"]))
    if "server" in runs:
        lines.append(_row("against a running `prefect server start` (`PREFECT_API_URL` set; default: flow run)",
                          runs["server"]))
    lines += [
        f"| first run of each way, new Prefect home: default / `--prefect` | {cold['plain'][0]:.1f} / "
        f"{cold['prefect'][0]:.1f} | {cold['plain'][1]:.2f} / {cold['prefect'][1]:.2f} "
        f"| {cold['plain'][0] - cold['plain'][1]:.1f} / {cold['prefect'][0] - cold['prefect'][1]:.1f} |",
        "",
        f"Target (issue 12): ≤ {TARGET_S:.0f} s beyond the compute without a Prefect API: "
        f"{plain_over:.1f} s, {'met' if plain_over <= TARGET_S else 'missed'}.",
        "",
        "| phase (one fresh process per way, the same steps, timed; the cluster's start overlaps the model's load) "
        "| default, no Prefect s | `--workers 1` s | `--prefect` s |",
        "|---|---|---|---|",
    ]
    for key, label in PHASES:
        lines.append(f"| {label} | " + " | ".join(f"{parts[m].get(key, 0.0):.2f}" for m in MODES) + " |")
    lines.append("| **total** (to the end of the run) | " + " | ".join(f"**{parts[m]['total']:.2f}**" for m in MODES)
                 + " |")
    lines.append("| then process exit (Prefect: its temporary server's stop; interpreter teardown) | "
                 + " | ".join(f"{parts[m]['exit']:.2f}" for m in MODES) + " |")
    body = "\n".join(lines)
    report.publish(body, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
