"""`segflow schedule` against a real Prefect server: serve the nightly deployment, trigger a run, see it complete.

A `prefect server start` process (SQLite, in a temporary PREFECT_HOME) on a
free loopback port; `segflow schedule` serves ``nightly/<name>`` with a cron
far in the future; `prefect deployment run` asks for a run now; the served
process picks it up and runs the nightly flow end to end (outputs and report
written).  Then `prefect deploy` registers infra/prefect.yaml's deployments on
the same server, and the server's copy is checked against the file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).with_name("prefect")
NAME = "segflow-test"
RUN_TIMEOUT = 240  # s, from trigger to a finished flow run (2 shared cores; the run starts a Dask cluster)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _get(url: str) -> dict | None:
    import httpx

    try:
        r = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A `prefect server start` process; yields (api_url, env for its clients)."""
    if not PREFECT.exists():
        pytest.skip(f"{PREFECT} (the prefect command of this environment) is absent")
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_SERVER_UI_ENABLED": "false",
           "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "COLUMNS": "200"}
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                            stdout=log, stderr=subprocess.STDOUT, env=server_env, cwd=home, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _get(f"{api}/health") is not True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield api, env
    finally:
        _stop(proc)
        log.close()


def _scene(path: Path) -> Path:
    data = np.random.default_rng(3).integers(1, 255, (3, 96, 128), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=128, height=96, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    return path


@pytest.mark.slow
def test_served_nightly_deployment_runs_end_to_end(prefect_server, tmp_path):
    import httpx

    api, env = prefect_server
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _scene(inbox / "scene.tif")
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)

    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "flows", "schedule", "--cron", "0 3 1 1 *", "--name", NAME,
                              "--inbox", str(inbox), "--model", str(model.path), "--out", str(out),
                              "--workers", "1", "--vector", "gpkg", "--retries", "1", "--parallel", "2"],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        # the deployment appears on the server once `segflow schedule` has registered it
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"segflow schedule did not register: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            deployment = _get(f"{api}/deployments/name/nightly/{NAME}")
            time.sleep(0.5)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 1 1 *"]
        assert deployment["parameters"]["inbox"] == str(inbox)
        assert deployment["parameters"]["model_dirs"] == [str(model.path)]
        # segment's output options and nightly's own reach the deployment (schedule had offered neither)
        assert deployment["parameters"]["options"]["vector"] == "gpkg" and deployment["parameters"]["retries"] == 1
        assert deployment["parameters"]["parallel"] == 2  # nightly's --parallel: a flow parameter, so served too
        assert deployment["entrypoint"] == "flows.nightly.nightly"
        # the automation that marks a run whose process died unreported (a stopped pod) Crashed: without it, such
        # a run stayed Running for ever and held the one-run-at-a-time slot (flows/zombies.py)
        from flows.zombies import AUTOMATION_NAME, SILENT_AFTER_S

        [automation] = [a for a in httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
                        if a["name"] == AUTOMATION_NAME]
        trigger_spec = automation["trigger"]
        assert trigger_spec["posture"] == "Proactive" and trigger_spec["within"] == SILENT_AFTER_S
        assert trigger_spec["after"] == ["prefect.flow-run.heartbeat"]
        assert trigger_spec["match_related"] == {"prefect.resource.id": ["prefect.tag.segflow"]}
        assert automation["actions"][0]["state"] == "CRASHED"
        assert "created the Prefect automation" in (tmp_path / "serve.log").read_text()

        trigger = subprocess.run([str(PREFECT), "deployment", "run", f"nightly/{NAME}"], capture_output=True,
                                 text=True, env=env, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)

        deadline = time.monotonic() + RUN_TIMEOUT
        state = None
        while time.monotonic() < deadline:
            run = _get(f"{api}/flow_runs/{run_id}") or {}
            state = (run.get("state") or {}).get("type")
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        assert state == "COMPLETED", (state, (tmp_path / "serve.log").read_text()[-4000:])

        # a night that cannot start (its inbox gone) is one line on the serving console; Prefect's flow engine had
        # logged 15 lines of traceback under it
        before = (tmp_path / "serve.log").stat().st_size
        gone = tmp_path / "gone"
        trigger = subprocess.run([str(PREFECT), "deployment", "run", f"nightly/{NAME}", "--params",
                                  json.dumps({"inbox": str(gone)})], capture_output=True, text=True, env=env,
                                 timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        failed_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
        failed = _wait_for_run(api, failed_id, serve, tmp_path / "serve.log")
        assert failed["state"]["type"] == "FAILED", failed["state"]
        time.sleep(2)  # the runner's last lines about the run's process
        with open(tmp_path / "serve.log", "rb") as f:
            f.seek(before)
            said = f.read().decode(errors="replace")
        assert str(gone) in said and "Traceback" not in said, said
    finally:
        _stop(serve)
        log.close()
    assert run["deployment_id"] == deployment["id"]
    assert (out / "scene.tif").exists() and (out / "scene.provenance.json").exists()
    assert (out / "scene.gpkg").is_file()
    reports = sorted((out / "reports").glob("*.json"))
    assert reports, sorted(p.name for p in out.rglob("*"))
    by_run = {json.loads(r.read_text())["run"].get("flow_run_id"): r for r in reports}
    assert set(by_run) == {run_id, failed_id}  # the night that could not start wrote its report too
    report = json.loads(by_run[run_id].read_text())
    assert [r["status"] for r in report["inputs"]] == ["done"]
    # the server saw the run's one task run per input, completed
    tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}, timeout=10).json()
    per_input = [t for t in tasks if t["name"].startswith("segment-")]
    assert [t["state"]["type"] for t in per_input] == ["COMPLETED"]
    # the run's Prefect artifacts, read back from the server: the results table, the summary, the HTML report link
    found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
                       timeout=10).json()
    by_key = {a["key"]: a for a in found}
    assert set(by_key) == {"segflow-nightly-inputs", "segflow-nightly-summary", "segflow-nightly-html-report"}
    table = by_key["segflow-nightly-inputs"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert table["type"] == "table" and [(r["input"], r["status"]) for r in rows] == [("scene.tif", "done")]
    html = by_run[run_id].with_suffix(".html")
    assert by_key["segflow-nightly-html-report"]["data"] == f"[{html}]({html.as_uri()})"
    summary = by_key["segflow-nightly-summary"]
    assert summary["type"] == "markdown" and "**1 input: 1 done, 0 skipped**" in summary["data"]
    quicklook = out / "scene.quicklook.png"  # on by default in a scheduled nightly, as in `segflow nightly`
    assert quicklook.is_file() and f"]({quicklook.as_uri()})" in summary["data"]


def _flow(entrypoint: str):  # noqa: ANN202
    """The flow object of a module-path entrypoint (package.module.attribute)."""
    import importlib

    module, _, attr = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _wait_for_run(api: str, run_id: str, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    run: dict = {}
    while time.monotonic() < deadline:
        run = _get(f"{api}/flow_runs/{run_id}") or {}
        if (run.get("state") or {}).get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        if proc.poll() is not None and not (run.get("state") or {}).get("type") == "RUNNING":
            time.sleep(2)  # a last look: the state may be reported just after the process ends
            return _get(f"{api}/flow_runs/{run_id}") or run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} did not finish in {RUN_TIMEOUT} s: {log.read_text()[-4000:]}")


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_work_pool_and_a_worker_runs_it(prefect_server, tmp_path):
    api, env = prefect_server
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    for pool in pools:
        proc = subprocess.run([str(PREFECT), "work-pool", "create", pool, "--type", "process"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(PREFECT), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for d in spec["deployments"]:
        served = _get(f"{api}/deployments/name/{_flow(d['entrypoint']).name}/{d['name']}")
        assert served is not None, d["name"]
        assert served["entrypoint"] == d["entrypoint"]
        assert served["work_pool_name"] == d["work_pool"]["name"]
        assert served["parameters"] == d["parameters"]
        assert [s["schedule"]["cron"] for s in served["schedules"]] == [s["cron"] for s in d["schedules"]]

    # a process worker picks up a run of the first deployment (its paths pointed at this test's folders)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _scene(inbox / "scene.tif")
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    first = spec["deployments"][0]
    params = {"inbox": str(inbox), "out_dir": str(out), "model_dirs": [str(model.path)]}
    trigger = subprocess.run([str(PREFECT), "deployment", "run", f"{_flow(first['entrypoint']).name}/{first['name']}",
                              "--params", json.dumps(params)], capture_output=True, text=True, env=env, timeout=120)
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([str(PREFECT), "worker", "start", "--pool", first["work_pool"]["name"],
                                   "--run-once"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                  start_new_session=True)
        try:
            run = _wait_for_run(api, run_id, worker, log_path)
        finally:
            _stop(worker)
    assert run["state"]["type"] == "COMPLETED", log_path.read_text()[-4000:]
    assert (out / "scene.tif").exists()

    # `segflow schedule` under a work-pool deployment's name would take it over (flow.serve updates it in place):
    # refused in one line, and the server's deployment keeps its pool, schedule and parameters
    path = f"{api}/deployments/name/{_flow(first['entrypoint']).name}/{first['name']}"
    before = _get(path)
    proc = subprocess.run([sys.executable, "-m", "flows", "schedule", "--cron", "0 3 1 1 *", "--name", first["name"],
                           "--inbox", str(inbox), "--model", str(model.path), "--out", str(tmp_path / "out2")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr  # a bad argument, as cli.fail exits
    assert f"already deployed on {api} to the work pool '{first['work_pool']['name']}'" in lines[0], lines
    after = _get(path)
    assert (after["work_pool_name"], after["parameters"], after["schedules"]) == \
        (before["work_pool_name"], before["parameters"], before["schedules"])


def test_a_prefect_worker_with_the_deployments_options_answers_its_health_check(prefect_server, tmp_path):
    """infra's Prefect workers run with ``--with-healthcheck`` (their liveness probe): a real worker of the same
    command answers ``/health`` on its webserver port, and stops answering once it is gone."""
    import urllib.request

    api, env = prefect_server
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    cmd = [str(c) for c in compose["services"]["prefect-worker"]["command"]]
    assert cmd[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in cmd
    port = _free_port()
    cmd[cmd.index("--pool") + 1] = "health-check-pool"
    worker = subprocess.Popen([str(PREFECT), *cmd[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**env, "PREFECT_WORKER_WEBSERVER_PORT": str(port)}, cwd=tmp_path,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline, status = time.monotonic() + 90, None
        while status != 200 and time.monotonic() < deadline and worker.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=3) as res:
                    status = res.status
            except OSError:
                time.sleep(1)
        assert status == 200, f"no answer from {url} (worker exit code {worker.poll()})"
    finally:
        _stop(worker)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=3)


def test_schedule_refuses_bad_input_with_one_line_errors(tmp_path):
    from flows.schedule import check_parameters, cron_schedule, load_flow, nightly_parameters
    from storage.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid --cron"):
        cron_schedule("61 * * * *")
    with pytest.raises(ConfigError, match="unknown --timezone"):
        cron_schedule("0 2 * * *", "Mars/Base")
    assert cron_schedule("0 2 * * *", "Europe/Paris").timezone == "Europe/Paris"
    with pytest.raises(ConfigError, match="one of them"):
        nightly_parameters(model_dirs=["m"], out_dir="o", inbox="i", manifest="f.csv")
    params = nightly_parameters(model_dirs=["m"], out_dir="o", manifest="f.csv")
    assert params["manifest"] == str(Path("f.csv").absolute()) and "inbox" not in params
    flow = load_flow()
    check_parameters(flow, params)
    with pytest.raises(ConfigError, match="no parameter colour"):
        check_parameters(flow, {**params, "colour": "red"})
    with pytest.raises(ConfigError, match="needs the parameter"):
        check_parameters(flow, {"out_dir": "o"})

    # without a Prefect server to talk to, `segflow schedule` says how to start one
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (tmp_path / "inbox").mkdir()
    proc = subprocess.run([sys.executable, "-m", "flows", "schedule", "--cron", "0 2 * * *", "--inbox",
                           str(tmp_path / "inbox"), "--model", str(model.path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prefect server start" in errors[0], proc.stderr
    # a manifest every night would refuse (no path column) is refused before anything registers; one that does
    # not exist yet (another job writes it before each night) is said, not refused
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.tif\n")
    later = tmp_path / "later.csv"
    for manifest in (bad, later):
        proc = subprocess.run([sys.executable, "-m", "flows", "schedule", "--cron", "0 2 * * *", "--manifest",
                               str(manifest), "--model", str(model.path), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        if manifest == bad:
            assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and "'path' column" in lines[0], lines
        else:
            assert lines[0] == (f"note: --manifest {later} does not exist yet; each night reads it when it starts, "
                                "and fails if it is still missing"), lines
            assert "prefect server start" in lines[-1]


def test_schedule_keeps_urls_as_urls(tmp_path, monkeypatch):
    """`--out s3://bucket/out/` (and an inbox or manifest URL) reached the deployment as 's3:/bucket/out' under
    the working directory: the options were paths, which collapse '//'. What would be served is read here
    (the serving itself, against a real server, is the end-to-end test above)."""
    from typer.testing import CliRunner

    from flows import schedule
    from flows.cli import app

    served = {}
    monkeypatch.setattr(schedule, "api_url", lambda: "http://127.0.0.1:9/api")  # Prefect's settings load once
    monkeypatch.setattr(schedule, "server_problem", lambda: None)
    monkeypatch.setattr(schedule, "serve_nightly", lambda **kwargs: served.update(kwargs))
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    for source in (["--inbox", "s3://bucket/inbox/"], ["--manifest", "s3://bucket/lists/tonight.csv"]):
        result = CliRunner().invoke(app, ["schedule", "--cron", "0 2 * * *", *source, "--model", str(model.path),
                                          "--out", "s3://bucket/out/"])
        assert result.exit_code == 0, result.output
        key = source[0].lstrip("-")
        assert served["parameters"]["out_dir"] == "s3://bucket/out/" and served["parameters"][key] == source[1]


def test_schedule_refuses_what_every_scheduled_night_would_fail_on_before_registering(tmp_path, monkeypatch):
    """A model without its weights, an --out inside the inbox, an inbox that is no folder: `nightly` refuses each
    in one line, and `schedule` had registered them, so that every night failed.  A name Prefect cannot take had
    ended in its traceback."""
    import shutil

    from typer.testing import CliRunner

    from flows import schedule
    from flows.cli import app

    served = []
    monkeypatch.setattr(schedule, "api_url", lambda: "http://127.0.0.1:9/api")
    monkeypatch.setattr(schedule, "server_problem", lambda: None)
    monkeypatch.setattr(schedule, "serve_nightly", lambda **kwargs: served.append(kwargs))
    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=3)
    broken = tmp_path / "broken"
    shutil.copytree(model.path, broken)
    (broken / "weights.safetensors").unlink()
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def refused(*args: str) -> str:
        result = CliRunner().invoke(app, ["schedule", "--cron", "0 2 * * *", *args])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        return " ".join(result.output.split())

    assert "no weights.safetensors" in refused("--inbox", str(inbox), "--model", str(broken), "--out", str(tmp_path / "o"))
    assert "is inside the inbox" in refused("--inbox", str(inbox), "--model", str(model.path), "--out",
                                            str(inbox / "out"))
    assert "inbox is not a directory" in refused("--inbox", str(tmp_path / "nowhere"), "--model", str(model.path),
                                                 "--out", str(tmp_path / "o"))
    assert "may not contain '/' or '%'" in refused("--name", "a/b", "--inbox", str(inbox), "--model",
                                                   str(model.path), "--out", str(tmp_path / "o"))
    assert served == []  # nothing registered
    result = CliRunner().invoke(app, ["schedule", "--cron", "0 2 * * *", "--inbox", str(inbox), "--model",
                                      str(model.path), "--out", str(tmp_path / "o"), "--paused"])
    assert result.exit_code == 0, result.output
    assert len(served) == 1 and served[0]["paused"] is True and "paused (runs by hand" in result.output
