"""infra/: the deployment files parse and agree with each other and with the code.

Nothing here builds an image or starts a container (no network, no Docker
daemon in CI): the checks are structural.  The Prefect side of
``infra/prefect.yaml`` is exercised for real in tests/test_schedule.py
(``prefect deploy`` to a live server, and a process worker running it).
"""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DATA_PATHS = {"/data/inbox", "/data/out", "/models"}


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(INFRA / "compose.yaml")


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return _load(INFRA / "prefect.yaml")


def _command(service_or_container: dict) -> list[str]:
    cmd = service_or_container.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with VAR unset: the default, or empty."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _scheduler_address(cmd: list[str]) -> tuple[str, int]:
    addr = next(c for c in cmd if c.startswith("tcp://"))
    url = urlparse(addr)
    return url.hostname, url.port


# ----------------------------------------------------------------------------- compose


def test_compose_services_and_dependencies(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "dask-scheduler", "dask-worker", "prefect-worker"} <= services.keys()
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        deps = svc.get("depends_on") or {}
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, f"{name} depends on unknown service {dep}"
            if (spec or {}).get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
        if "healthcheck" in svc:
            test = svc["healthcheck"]["test"]
            assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
    for name in ("postgres", "prefect-server", "dask-scheduler"):
        assert "healthcheck" in services[name], name
    build = services["dask-worker"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"
    assert build["args"]["SEGFLOW_COMMIT"] == "${SEGFLOW_COMMIT:-}"  # the commit outputs' provenance names


def test_compose_prefect_server_uses_postgres_and_the_worker_finds_the_server(compose, prefect_yaml):
    services = compose["services"]
    pg_env = _env(services["postgres"])
    db = urlparse(_interpolate(_env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]))
    assert db.scheme == "postgresql+asyncpg"
    assert db.hostname == "postgres" and (db.port or 5432) == 5432
    assert db.username == pg_env["POSTGRES_USER"] and db.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert db.password == _interpolate(pg_env["POSTGRES_PASSWORD"])
    server_cmd = _command(services["prefect-server"])
    assert server_cmd[:3] == ["prefect", "server", "start"]
    port = int(_option(server_cmd, "--port"))
    assert any(str(p).split(":")[-1] == str(port) for p in services["prefect-server"]["ports"])
    for name in ("prefect-worker", "deploy"):
        api = urlparse(_env(services[name])["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", port, "/api"), name
    worker_cmd = _command(services["prefect-worker"])
    assert worker_cmd[:3] == ["prefect", "worker", "start"] and _option(worker_cmd, "--type") == "process"
    pools = {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    assert pools == {_option(worker_cmd, "--pool")}
    deploy = " ".join(_command(services["deploy"]))
    assert "prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml" in deploy
    # the zombie-run automation (infra/README.md, section 3), which a compose set-up had never created
    assert deploy.index("prefect.yaml && python -m flows.zombies") > deploy.index("deploy --all")
    assert services["deploy"]["working_dir"] == "/opt/segflow"  # where infra/Dockerfile puts the code
    # no pull step: without `pull: []`, `prefect deploy` from a laptop recorded the laptop's folder as every run's
    # working directory, which a worker pod does not have
    assert prefect_yaml["pull"] == []


def test_compose_dask_workers_reach_the_scheduler_and_share_the_data(compose):
    services = compose["services"]
    sched_cmd = _command(services["dask-scheduler"])
    assert sched_cmd[:2] == ["dask", "scheduler"]
    host, port = _scheduler_address(_command(services["dask-worker"]))
    assert host == "dask-scheduler" and host in services
    assert port == int(_option(sched_cmd, "--port"))
    worker_cmd = _command(services["dask-worker"])
    assert worker_cmd[:2] == ["dask", "worker"]

    declared = set((compose.get("volumes") or {}).keys())
    mounts = {}
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source, target = _interpolate(str(vol)).split(":")[:2]
            if not source.startswith((".", "/", "~")):  # a named volume must be declared
                assert source in declared, f"{name} uses undeclared volume {source}"
            mounts.setdefault(name, set()).add(target)
    # the flow (Prefect worker) ingests into /data/out; the Dask workers read and write there
    assert DATA_PATHS <= mounts["prefect-worker"] and DATA_PATHS <= mounts["dask-worker"]
    # its window work goes to the scheduler service (Dask's own setting, which SegmentOptions reads)
    worker_env = services["prefect-worker"]["environment"]
    assert _scheduler_address([worker_env["DASK_SCHEDULER_ADDRESS"]]) == (host, port)
    _shared_working_folders(worker_env, mounts["prefect-worker"] & mounts["dask-worker"])
    assert "/var/lib/postgresql/data" in mounts["postgres"]


def _shared_working_folders(env: dict, shared_mounts: set[str]) -> None:
    """Outputs bound for a URL are written by the Dask workers into the staging folder and uploaded from the flow's
    process: in a container's own /tmp (the default) the upload found nothing and every input failed."""
    for name in ("SEGFLOW_STAGING_DIR", "SEGFLOW_LOG_DIR"):
        folder = env[name]
        assert any(folder == m or folder.startswith(m.rstrip("/") + "/") for m in shared_mounts), (name, folder)


# ----------------------------------------------------------------------------- kubernetes


def test_k8s_objects_are_well_formed(k8s):
    assert k8s
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        assert doc["metadata"]["name"], doc["__file__"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s}
    assert {("Deployment", "dask-scheduler"), ("Service", "dask-scheduler"), ("Deployment", "dask-worker"),
            ("Deployment", "dask-worker-gpu"), ("Deployment", "prefect-worker"), ("ConfigMap", "segflow-env")} <= kinds
    configmaps = {d["metadata"]["name"] for d in k8s if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in k8s if d["kind"] == "PersistentVolumeClaim"}
    for dep in (d for d in k8s if d["kind"] == "Deployment"):
        assert dep["apiVersion"] == "apps/v1"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["name"] and c["image"], dep["metadata"]["name"]
            assert c.get("command"), dep["metadata"]["name"]
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, (dep["metadata"]["name"], m["name"])
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
    for svc in (d for d in k8s if d["kind"] == "Service"):
        selected = [d for d in k8s if d["kind"] == "Deployment"
                    and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {svc['metadata']['name']} selects no Deployment"


def _deployment(k8s, name):
    return next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def test_k8s_dask_workers_point_at_the_scheduler_service(k8s):
    from flows.cluster import GPU, GPU_WORKER_THREADS

    service = next(d for d in k8s if d["kind"] == "Service" and d["metadata"]["name"] == "dask-scheduler")
    sched = _deployment(k8s, "dask-scheduler")
    sched_cmd = sched["spec"]["template"]["spec"]["containers"][0]["command"]
    comm = next(p for p in service["spec"]["ports"] if p["port"] == int(_option(sched_cmd, "--port")))
    assert comm["targetPort"] in ("comm", comm["port"])
    for name in ("dask-worker", "dask-worker-gpu"):
        container = _deployment(k8s, name)["spec"]["template"]["spec"]["containers"][0]
        assert _scheduler_address(container["command"]) == (service["metadata"]["name"], comm["port"]), name
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/data", "/models"} <= mounts
    gpu = _deployment(k8s, "dask-worker-gpu")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["command"][:3] == ["dask", "cuda", "worker"]
    assert _option(gpu["command"], "--resources") == f"{GPU}=1"  # what flows.cluster.gpu_tasks asks for
    # two window tasks per GPU and host tasks beside them (dask-cuda's default of one ran them all in turn)
    assert _option(gpu["command"], "--nthreads") == str(GPU_WORKER_THREADS)
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "cuda" in gpu["image"]
    cpu = _deployment(k8s, "dask-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(cpu["resources"])


def test_k8s_prefect_worker_and_config(k8s, prefect_yaml):
    config = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "segflow-env")
    api = urlparse(config["data"]["PREFECT_API_URL"])
    assert api.scheme == "http" and api.hostname and api.path == "/api"
    assert all(isinstance(v, str) for v in config["data"].values())  # ConfigMap values must be strings
    container = _deployment(k8s, "prefect-worker")["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and _option(cmd, "--type") == "process"
    assert _option(cmd, "--pool") in {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    assert {"/data", "/models"} <= {m["mountPath"] for m in container["volumeMounts"]}
    service = next(d for d in k8s if d["kind"] == "Service" and d["metadata"]["name"] == "dask-scheduler")
    env = {e["name"]: e["value"] for e in container.get("env") or []}
    host, port = _scheduler_address([env["DASK_SCHEDULER_ADDRESS"]])
    assert host == service["metadata"]["name"] and port in {p["port"] for p in service["spec"]["ports"]}
    # envFrom the ConfigMap, which the Dask workers get too; /data is the shared claim every pod mounts
    _shared_working_folders(config["data"], {"/data"})


def test_kustomization_lists_the_manifests():
    kustom = _load(K8S / "kustomization.yaml")
    listed = set(kustom["resources"])
    assert all((K8S / r).exists() for r in listed)
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests - listed == {"dask-worker-gpu.yaml"}  # applied by hand, on clusters with GPU nodes


def test_kubectl_renders_the_kustomization():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]
    assert kinds.count("Deployment") == 3 and "Service" in kinds and "ConfigMap" in kinds


def _health_port(check: list[str]) -> int:
    """The port a compose health check's Python one-liner asks ``/health`` of."""
    return int(re.search(r"http://localhost:(\d+)/health", " ".join(check)).group(1))


def test_workers_have_health_checks_on_the_ports_they_serve(compose, k8s):
    """The Dask and Prefect workers had none: a hung worker went on holding its tasks, and a Prefect worker that
    had stopped polling left every scheduled night waiting, both unseen."""
    from prefect.settings import get_current_settings

    services = compose["services"]
    cmd = _command(services["dask-worker"])
    assert _health_port(services["dask-worker"]["healthcheck"]["test"]) == int(_option(cmd, "--dashboard-address")[1:])
    cmd = _command(services["prefect-worker"])
    assert "--with-healthcheck" in cmd
    prefect_port = get_current_settings().worker.webserver.port
    assert _health_port(services["prefect-worker"]["healthcheck"]["test"]) == prefect_port
    for name in ("dask-worker", "dask-worker-gpu", "prefect-worker"):
        container = _deployment(k8s, name)["spec"]["template"]["spec"]["containers"][0]
        probe = container["livenessProbe"]["httpGet"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])
        assert probe["path"] == "/health", name
        if name == "prefect-worker":
            assert "--with-healthcheck" in container["command"]
            assert port == get_current_settings().worker.webserver.port
        else:
            assert int(_option(container["command"], "--dashboard-address")[1:]) == port, name


def test_a_dask_worker_started_as_compose_starts_it_answers_its_health_check(compose, tmp_path):
    """``--no-dashboard`` drops the worker's pages but not its HTTP server: the health check asks a real worker,
    started with the compose service's own options (the scheduler's address and the port made local)."""
    import socket
    import sys
    import time

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    dask = Path(sys.executable).with_name("dask")
    if not dask.exists():
        pytest.skip(f"{dask} (the dask command of this environment) is absent")
    sched_port, http_port = free_port(), free_port()
    service = compose["services"]["dask-worker"]
    cmd = [_interpolate(c) for c in _command(service)]
    cmd = [f"tcp://127.0.0.1:{sched_port}" if c.startswith("tcp://") else c for c in cmd]
    cmd[cmd.index("--dashboard-address") + 1] = f"127.0.0.1:{http_port}"
    cmd[cmd.index("--memory-limit") + 1] = "1GiB"
    check = [c.replace(f"localhost:{_health_port(service['healthcheck']['test'])}", f"127.0.0.1:{http_port}")
             for c in service["healthcheck"]["test"][1:]]
    assert check[0] == "python"
    procs = []
    try:
        procs.append(subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([str(dask), *cmd[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            rc = subprocess.run([sys.executable, *check[1:]], capture_output=True, timeout=30).returncode
            if rc == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert rc == 0, "the compose health check never passed on a running worker"
        procs[1].terminate()
        procs[1].wait(timeout=60)
        rc = subprocess.run([sys.executable, *check[1:]], capture_output=True, timeout=30).returncode
        assert rc != 0  # and it fails once the worker is gone
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------------------- prefect.yaml


def _flow(entrypoint: str):  # noqa: ANN202
    import importlib

    module, _, attr = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_prefect_yaml_entrypoints_resolve_to_flows_with_the_declared_parameters(prefect_yaml):
    from prefect import Flow
    from prefect.schedules import validate_cron_string

    from flows.config import SegmentOptions
    from flows.schedule import check_parameters

    deployments = prefect_yaml["deployments"]
    assert len({d["name"] for d in deployments}) == len(deployments)
    for d in deployments:
        assert ":" not in d["entrypoint"]  # module path: a file path breaks on flows/flows.py (see prefect.yaml)
        flow = _flow(d["entrypoint"])
        assert isinstance(flow, Flow) and flow.name == "nightly"
        check_parameters(flow, d["parameters"])  # no unknown names, no missing required ones
        params = inspect.signature(flow.fn).parameters
        assert set(d["parameters"]) <= set(params)
        SegmentOptions.model_validate(d["parameters"].get("options") or {})
        assert isinstance(d["parameters"]["model_dirs"], list)
        for s in d["schedules"]:
            validate_cron_string(s["cron"])
        assert d["work_pool"]["name"]
    # the cluster comes from the Prefect worker's environment (compose and k8s name theirs), not a deployment of its
    # own: the operator who switched a second, paused one on was left with the shipped cluster idle
    assert not any((d["parameters"].get("options") or {}).get("dask_address") for d in deployments)


def test_schedule_command_and_prefect_yaml_share_the_flow(prefect_yaml):
    from flows.schedule import DEFAULT_NAME, NIGHTLY, load_flow

    assert load_flow(NIGHTLY) is _flow(prefect_yaml["deployments"][0]["entrypoint"])
    # one server may hold both: `segflow schedule`'s default must not take a work-pool deployment over
    assert DEFAULT_NAME not in {d["name"] for d in prefect_yaml["deployments"]}


# ----------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_project(name):
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL"}
    steps = _instructions(INFRA / name)
    assert all(word in known for word, _ in steps), steps
    first = next(i for i, (word, _) in enumerate(steps) if word != "ARG")
    assert steps[first][0] == "FROM"
    assert sum(word == "FROM" for word, _ in steps) == 1
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"
    copied = {a.split()[0] for w, a in steps if w == "COPY"}
    assert {"storage", "segmentation", "flows", "infra/prefect.yaml"} <= copied and "pyproject.toml" in " ".join(copied)
    # infra/data holds a compose user's scans, outputs and models: copying infra/ baked them into every image
    assert "infra" not in copied and not any(src.startswith("infra/data") for src in copied)
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), f"{name} does not install the project"
    assert re.search(r"--index-url \"?\$\{TORCH_INDEX\}", runs)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    # one Python in both images: GPU workers (CUDA image) join a scheduler and client of the CPU image, and Dask's
    # client, scheduler and workers must share it (an Ubuntu CUDA base had Python 3.12 against 3.11)
    assert steps[first][1] == "python:3.11-slim"
    # and one dask: DASK_VERSION pins both images' dask and distributed to dask-cuda's (infra/README.md)
    assert "DASK_VERSION" in {a.split("=", 1)[0] for w, a in steps if w == "ARG"}
    assert '"dask==${DASK_VERSION}" "distributed==${DASK_VERSION}"' in runs
    if name == "Dockerfile":
        assert args["TORCH_INDEX"].endswith("/whl/cpu")
    else:
        assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX"])
        assert "dask-cuda" in runs
    assert steps[-1][0] == "CMD"
    assert any(w == "USER" and a != "root" for w, a in steps)
    assert "--uid 10001 --gid 10001" in runs  # the k8s manifests' runAsUser, runAsGroup and fsGroup
    # an image has no .git: the build argument is what outputs' provenance names as their code (git_commit)
    from storage.provenance import SOURCE_COMMIT_VARIABLE

    assert "SEGFLOW_COMMIT" in {a.split("=", 1)[0] for w, a in steps if w == "ARG"}
    assert f"{SOURCE_COMMIT_VARIABLE}=${{SEGFLOW_COMMIT}}" in [a for w, a in steps if w == "ENV"]


def test_the_build_context_leaves_out_data_and_local_environments():
    """compose builds with the repository root as context: without a .dockerignore it sent .venv, demo runs and
    infra/data (patient scans, when a compose user keeps them there) to the daemon."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "demo", "infra/data", ".git"} <= ignored
    for name in ("Dockerfile", "Dockerfile.cuda"):
        for word, args in _instructions(INFRA / name):
            if word == "COPY":
                *sources, _ = args.split()
                assert not any(src in ignored or any(src.startswith(i + "/") for i in ignored) for src in sources)


def test_k8s_pods_run_as_the_images_user_and_the_data_folders_exist(k8s):
    """No securityContext: a fresh claim at /data (root's, hiding the image's folders) left /data/out unwritable
    for uid 10001 and /data/inbox missing, so every nightly run failed."""
    for name in ("dask-scheduler", "dask-worker", "dask-worker-gpu", "prefect-worker"):
        pod = _deployment(k8s, name)["spec"]["template"]["spec"]
        assert pod["securityContext"] == {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}, name
    pod = _deployment(k8s, "prefect-worker")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["securityContext"]["runAsUser"] == 0 and {m["mountPath"] for m in init["volumeMounts"]} == {"/data"}
    assert "mkdir -p /data/inbox /data/out" in init["command"][-1] and "chown 10001:10001" in init["command"][-1]


def test_readme_documents_the_commands():
    text = (INFRA / "README.md").read_text()
    for needle in ("prefect server start", "prefect work-pool create", "--type process",
                   "prefect deploy", "prefect worker start", "segflow schedule", "docker compose",
                   "kubectl apply", "--dask-address", "--gpus", "not built"):
        assert needle in text, needle
