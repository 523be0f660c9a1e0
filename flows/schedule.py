"""``segflow schedule``: serve the ``nightly`` flow as a Prefect deployment on a cron schedule.

``serve_nightly`` registers the deployment ``nightly/<name>`` with the Prefect
server that ``PREFECT_API_URL`` names, then runs in the foreground: at each
cron time the server schedules a flow run, and this process runs it (in a
subprocess, one at a time).  Runs can also be started by hand from the UI or
with ``prefect deployment run 'nightly/<name>'``.

Prefect's temporary per-process server runs no scheduler, so a real server is
required: ``prefect server start``.  ``infra/prefect.yaml`` declares the same
deployment for a work pool instead (``prefect deploy``; see infra/README.md).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, List, Optional

import typer

from flows import cliopts
from flows.config import SegmentOptions
from storage.errors import ConfigError

DEFAULT_NAME = "segflow-schedule"  # not infra/prefect.yaml's segflow-nightly: serving one would take the other over
NIGHTLY = "flows.nightly:nightly"  # module:attribute of the flow the deployment runs


def load_flow(ref: str = NIGHTLY) -> Any:
    """The Prefect flow ``module:attribute`` names (imported on demand)."""
    from prefect import Flow

    module_name, _, attr = ref.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(None, f"cannot load the flow {ref}: {exc}") from None
    if not isinstance(obj, Flow):
        raise ConfigError(None, f"{ref} is not a Prefect flow")
    return obj


def nightly_parameters(*, model_dirs: list[str | Path], out_dir: str | Path, inbox: str | Path | None = None,
                       manifest: str | Path | None = None, options: SegmentOptions | None = None,
                       **extra: Any) -> dict[str, Any]:
    """The deployment's parameters, JSON-ready, with absolute paths (a run's working directory may differ)."""
    if (inbox is None) == (manifest is None):
        raise ConfigError(None, "give --inbox DIR or --manifest FILE (one of them)")
    if not model_dirs:
        raise ConfigError(None, "give at least one --model DIR")
    params: dict[str, Any] = {
        "model_dirs": [_absolute(m) for m in model_dirs],
        "out_dir": _absolute(out_dir),
        "inbox": None if inbox is None else _absolute(inbox),
        "manifest": None if manifest is None else _absolute(manifest),
        "options": (options or SegmentOptions()).model_dump(mode="json", exclude_defaults=True),
        **extra,
    }
    return {k: v for k, v in params.items() if v is not None}


def _absolute(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().absolute())


def check_parameters(flow: Any, parameters: dict[str, Any]) -> None:
    """Refuse parameters the flow does not take, and missing required ones, with one line."""
    signature = inspect.signature(flow.fn)
    unknown = sorted(set(parameters) - set(signature.parameters))
    if unknown:
        raise ConfigError(None, f"flow {flow.name!r} takes no parameter {', '.join(unknown)} "
                                f"(it takes {', '.join(signature.parameters)})")
    missing = [n for n, p in signature.parameters.items()
               if p.default is inspect.Parameter.empty and n not in parameters]
    if missing:
        raise ConfigError(None, f"flow {flow.name!r} needs the parameter(s) {', '.join(missing)}")


def cron_schedule(cron: str, timezone: str | None = None) -> Any:
    """A Prefect cron schedule; a bad expression or time zone is a one-line error."""
    from prefect.schedules import Cron, validate_cron_string

    try:
        validate_cron_string(cron)
    except ValueError:
        raise ConfigError(None, f"invalid --cron {cron!r} (five fields: minute hour day month weekday, "
                                "e.g. '0 2 * * *')") from None
    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(None, f"unknown --timezone {timezone!r} (use an IANA name, e.g. Europe/Paris)") from None
    try:
        return Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise ConfigError(None, f"invalid --cron {cron!r}: {' '.join(str(exc).split())}") from None


def api_url() -> str:
    """The Prefect server this process talks to; a temporary in-process server cannot run schedules."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(None, "segflow schedule needs a Prefect server: start one with `prefect server start` "
                                "and set PREFECT_API_URL=http://127.0.0.1:4200/api (see infra/README.md)")
    return url


def server_problem() -> BaseException | None:
    """What stops the configured Prefect server from answering a health check, or None when it answers; so a
    server that is down is one line before "serving ..." is announced."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.api_healthcheck()


def work_pool_of(name: str, flow_ref: str = NIGHTLY) -> str | None:
    """The work pool of an existing deployment ``<flow>/<name>`` (one ``prefect deploy`` made), else None.

    Serving under that name would silently turn the work-pool deployment
    into this process's, its schedule and parameters replaced.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{load_flow(flow_ref).name}/{name}")
        except ObjectNotFound:
            return None
    return deployment.work_pool_name


def serve_nightly(*, cron: str, parameters: dict[str, Any], name: str = DEFAULT_NAME, timezone: str | None = None,
                  flow_ref: str = NIGHTLY, paused: bool = False) -> None:
    """Register ``<flow>/<name>`` on the Prefect server and serve it until interrupted (blocks)."""
    from prefect.deployments.runner import EntrypointType

    api_url()
    flow = load_flow(flow_ref)
    check_parameters(flow, parameters)
    schedule = cron_schedule(cron, timezone)
    # module entrypoint: runs import the installed package, whatever directory this was started in;
    # limit=1: a night's run never overlaps the previous one
    flow.serve(name=name, schedule=schedule, parameters=parameters, paused=paused, limit=1,
               description=f"segflow nightly: {flow_ref} at '{cron}'" + (f" ({timezone})" if timezone else ""),
               tags=["segflow", "nightly"], entrypoint_type=EntrypointType.MODULE_PATH)


def schedule_command(
        cron: str = typer.Option(..., "--cron", help="When to run, as a cron expression, e.g. '0 2 * * *' (02:00)."),
        inbox: Optional[str] = typer.Option(None, "--inbox", help="Folder of inputs the nightly run looks at, or a "
                                                                  "URL prefix."),
        manifest: Optional[str] = typer.Option(None, "--manifest", help="CSV or JSON list of inputs, instead of "
                                                                        "--inbox (a path or URL)."),
        model: List[Path] = typer.Option(..., "--model", help="Model directory (repeat: each input goes to the "
                                                              "first model whose card fits it)."),
        out: str = typer.Option(..., "--out", help="Output directory, or a URL prefix (s3://bucket/out/)."),
        name: str = typer.Option(DEFAULT_NAME, "--name", help="Deployment name: runs are 'nightly/NAME'."),
        timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA time zone of --cron (default UTC)."),
        precision: cliopts.Precision = "exact",
        roi: Optional[str] = typer.Option(None, help="Window size, e.g. 256,256 (default: each card's)."),
        overlap: Optional[float] = typer.Option(None, help="Window overlap in [0, 1) (default: each card's)."),
        probabilities: str = typer.Option("none", help="Also store probabilities: none, float32 or uint8."),
        chunk_size: Optional[int] = typer.Option(None, help="Spatial chunk size of stores and tasks."),
        batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass."),
        workers: Optional[int] = typer.Option(None, help="Local Dask worker processes of each run (default: 1, "
                                                         "as in nightly; 0: threads of the run's process)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        dask_address: Optional[str] = typer.Option(None, help="Run on an existing Dask scheduler."),
        gpus: bool = typer.Option(False, "--gpus", help="One Dask worker per GPU (needs dask-cuda)."),
        no_zarr: bool = typer.Option(False, "--no-zarr", help="Do not keep OUT/<stem>.zarr."),
        quicklook: bool = typer.Option(True, "--quicklook/--no-quicklook",
                                       help="OUT/<stem>.quicklook.png beside each output (on by default, as in "
                                            "nightly), shown in the run's HTML report and Prefect artifacts."),
        paused: bool = typer.Option(False, "--paused", help="Register the schedule paused (runs by hand only)."),
        retries: cliopts.Retries = 2,
        retry_delay: cliopts.RetryDelay = 10.0,
        parallel: cliopts.Parallel = 1,
        lock_timeout: cliopts.LockTimeout = 600.0,
        source_root: cliopts.SourceRoots = None,
        settle: cliopts.Settle = 0.0,
        bands: cliopts.Bands = None,
        vector: cliopts.Vector = "none",
        simplify: cliopts.Simplify = None,
        output_grid: cliopts.OutputGrid = "input",
        model_space: cliopts.ModelSpace = "input",
        dicom_seg: cliopts.DicomSeg = "binary",
        tta: cliopts.Tta = None,
        crf: cliopts.Crf = False,
        crf_iterations: cliopts.CrfIterations = 5,
        compile: cliopts.Compile = False,
        trust_bundle: cliopts.TrustBundle = False,
) -> None:
    """Serve the nightly flow on a cron schedule against a Prefect server (PREFECT_API_URL); runs until stopped."""

    from flows import cliutil as cli
    from flows.runlog import api_unreachable
    from storage.errors import SegflowError
    from storage.remote import is_url

    options = cli.options(precision=precision, roi=cli.ints(roi), overlap=overlap, probabilities=probabilities,
                           chunk_size=chunk_size, batch_size=batch_size, workers=workers,
                           device=device, dask_address=dask_address, gpus=gpus, keep_zarr=not no_zarr,
                           quicklook=quicklook,
                           **cliopts.output_fields(bands=bands, vector=vector, simplify=simplify,
                                                   output_grid=output_grid, model_space=model_space,
                                                   dicom_seg=dicom_seg, tta=tta, crf=crf,
                                                   crf_iterations=crf_iterations, compile=compile,
                                                   trust_bundle=trust_bundle))
    cli.check_out_folder(out)
    cli.check_device(options)
    if "/" in name or "%" in name:  # Prefect's runner refuses them, with a traceback
        cli.fail(f"--name {name!r}: a deployment name may not contain '/' or '%'")
    # what a night would refuse, refused before anything registers: every scheduled run would fail on it
    cli.check_models(model, trust_bundle=trust_bundle, load=True, roi=options.roi, bands=options.bands)
    try:
        if inbox is not None and not is_url(cli.path_or_url(inbox)):
            from flows.inbox import check_inbox
            from flows.nightly import check_out_beside_inbox

            check_inbox(inbox)
            check_out_beside_inbox(inbox, cli.path_or_url(out))
        if manifest is not None and not is_url(cli.path_or_url(manifest)):
            from flows.inbox import read_manifest

            if Path(manifest).exists():  # a manifest with no path column had been registered to fail every night
                read_manifest(cli.path_or_url(manifest))
            else:  # written before each night by another job, perhaps: said, not refused
                cli.console.print(f"note: --manifest {manifest} does not exist yet; each night reads it when it "
                                  "starts, and fails if it is still missing", highlight=False, soft_wrap=True)
        parameters = nightly_parameters(model_dirs=model, out_dir=out, inbox=inbox, manifest=manifest,
                                        options=options, retries=retries, retry_delay_seconds=retry_delay,
                                        lock_stale_after=lock_timeout, settle_seconds=settle,
                                        parallel=parallel,
                                        source_roots=[_absolute(r) for r in source_root or []] or None)
        cron_schedule(cron, timezone)  # a bad --cron or --timezone is said before anything is announced
        url = api_url()
        problem = server_problem()
        if problem is not None:
            unreachable = api_unreachable(problem, temporary_ok=False)
            cli.fail(unreachable or f"the Prefect server at {url} does not answer: {problem}")
        pool = work_pool_of(name)
        if pool:
            cli.fail(f"--name {name!r}: nightly/{name} is already deployed on {url} to the work pool {pool!r} "
                     "(prefect deploy); serving it here would take it over: pass another --name")
        from flows.zombies import AUTOMATION_NAME, ensure_crash_automation, silent_after

        if ensure_crash_automation():  # a run whose process dies unreported is Crashed, not Running for ever
            cli.console.print(f"created the Prefect automation {AUTOMATION_NAME!r}: a segflow run silent for "
                              f"{silent_after():g} s is marked Crashed", highlight=False, soft_wrap=True)
        cli.console.print(f"serving nightly/{name} on {url} at '{cron}'" + (f" ({timezone})" if timezone else "")
                          + (", paused (runs by hand until resumed)" if paused else "") + "; Ctrl-C stops it",
                          highlight=False, soft_wrap=True)
        try:
            serve_nightly(cron=cron, parameters=parameters, name=name, timezone=timezone, paused=paused)
        except Exception as exc:
            unreachable = api_unreachable(exc, temporary_ok=False)  # a schedule needs a server that stays
            if unreachable is None:
                raise
            cli.fail(unreachable)
    except SegflowError as exc:
        cli.fail(str(exc))
