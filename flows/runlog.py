"""A ``segflow`` run with or without Prefect: its logger, its log file, and whether a Prefect API is configured.

A one-off ``segflow segment`` with no Prefect API to report to runs its flow's
body as a plain function: Prefect's temporary server and flow-run bookkeeping
cost more than the work of a small input (docs/performance.md, block
``startup``).  Code shared by both ways logs through :func:`run_logger`, which
is Prefect's run logger inside a flow or task run and the ``segflow`` logger
outside one.  Nothing here imports Prefect unless it is already imported (or
:func:`prefect_console` is entered): importing it costs 1-2 s, which the plain
path exists to save.

A command that runs a Prefect flow in its own process (``segment --prefect``,
``nightly``) shares the terminal with Prefect's console log.  Prefect logs a
task or flow that raised with its full traceback ("Encountered exception
during execution"); for an error segflow reports itself (a ``SegflowError``:
a bad input, model or folder) that buries the one line the command prints
after it.  :func:`prefect_console` keeps those records off the terminal and
writes them, with everything else Prefect and segflow log, to a log file
(:func:`log_dir`); anything else Prefect says (a bug's traceback, a server
warning) still shows.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from storage.errors import ConfigError, SegflowError, error_names

API_URL = "PREFECT_API_URL"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger in a flow or task run (its lines show in the UI), else the ``segflow`` logger."""
    if "prefect" in sys.modules:  # not imported: certainly not in a run
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            return get_run_logger()
    return logging.getLogger("segflow")


LOG_DIR_ENV = "SEGFLOW_LOG_DIR"
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect logs a run's failure


def log_dir() -> Path:
    """Where commands keep their log files: ``$SEGFLOW_LOG_DIR``, else ``$XDG_STATE_HOME/segflow/logs``, else
    ``~/.local/state/segflow/logs`` (XDG's place for logs, which outlive a cache's clean-up)."""
    given = os.environ.get(LOG_DIR_ENV, "").strip()
    if given:
        return Path(given).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "").strip()
    return (Path(state).expanduser() if state else Path.home() / ".local" / "state") / "segflow" / "logs"


@dataclass(frozen=True)
class RunLog:
    """A command's log file; it exists only once something was written to it."""

    path: Path

    @property
    def written(self) -> bool:
        return self.path.is_file()


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every exception it was raised from or during (``from None`` keeps the context)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]


SIGNAL_CRASH = "Execution was aborted by a"  # Prefect's crash message for SIGINT/SIGTERM ("an interrupt signal")


class ReportedElsewhere(logging.Filter):
    """Drops from a console what segflow tells the user itself, and segflow's own lines below warnings.

    A record is segflow's to report when its exception (or one it was raised
    from) is a ``SegflowError``, or when it is a Prefect run logger's error
    naming one ("Finished in state Failed('Task run encountered an exception
    CorruptInputError: ...')", which Prefect logs without the exception).
    """

    def __init__(self) -> None:
        super().__init__()
        self.named = re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, error_names()))) + r")\b[(:]")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "segflow" or record.name.startswith("segflow."):
            return record.levelno >= logging.WARNING
        if record.name.startswith(RUN_LOGGERS) and SIGNAL_CRASH in record.getMessage():
            # a SIGTERM in the moment Prefect's own handler holds (a flow run starting): the command says
            # "interrupted:" itself, and this "Crash detected!" had come above that line
            return False
        return not self.reports_segflow_error(record)

    def reports_segflow_error(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return any(isinstance(e, SegflowError) for e in exception_chain(exc))
        if record.name.startswith(RUN_LOGGERS) and record.levelno >= logging.ERROR:
            return bool(self.named.search(record.getMessage()))
        return False


class OwnErrorsInOneLine(logging.Filter):
    """A segflow error's record without its traceback, on a console of a run no segflow command reports: a served
    night that could not start (its manifest gone) had Prefect's 15 lines of flow-engine traceback under the one
    that says it.  Set on the console handler only: Prefect's API handler, on the run's own logger, has already
    sent the whole record to the server (the UI keeps the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and any(isinstance(e, SegflowError) for e in exception_chain(exc)):
            record.exc_info, record.exc_text = None, None
        return True


def own_errors_in_one_line() -> None:
    """:class:`OwnErrorsInOneLine` on Prefect's console handlers of this process, once."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:  # root's, as configured
        if isinstance(handler, PrefectConsoleHandler) and \
                not any(isinstance(f, OwnErrorsInOneLine) for f in handler.filters):
            handler.addFilter(OwnErrorsInOneLine())


class RunFormatter(logging.Formatter):
    """Log lines that name the Prefect flow or task run they come from (``[task run 'segment-a.tif']``)."""

    def format(self, record: logging.LogRecord) -> str:
        task, flow = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.run = f" [task run {task!r}]" if task else f" [flow run {flow!r}]" if flow else ""
        return super().format(record)


@contextmanager
def prefect_console(command: str) -> Iterator[RunLog]:
    """While ``command`` runs Prefect flows in this process: what Prefect and segflow log goes to a log file
    as well, and Prefect's console leaves out what segflow reports itself (:class:`ReportedElsewhere`).

    Prefect configures its logging on the first flow run; it is made to do so
    here first, so that its console handler exists to be filtered.  The file is
    created only when a record arrives.  Prefect's temporary server, where it
    runs one, gets the settings of :func:`_temporary_server_kept_quiet` and a database of the run's own
    (:mod:`flows.prefectdb`).
    """
    from prefect.logging.configuration import ensure_logging_setup

    from flows.prefectdb import run_database
    from flows.reaper import start_reaper

    ensure_logging_setup()
    temporary = not prefect_api_configured()
    if temporary:  # Prefect's temporary server will run: it must not outlive a killed command
        start_reaper()
    with _temporary_server_kept_quiet(), _temporary_server_in_its_own_session() if temporary else nullcontext(), \
            _console_to_log(command) as run_log, _server_logs_to(run_log.path) if temporary else nullcontext(), \
            run_database() if temporary else nullcontext():
        try:
            yield run_log
        except Exception as exc:
            unreachable = api_unreachable(exc)
            if unreachable is None:
                raise
            raise ConfigError(None, unreachable) from None


UNREACHABLE = "Failed to reach API at"  # how Prefect 3 says no server answered at PREFECT_API_URL


def api_unreachable(exc: BaseException, *, temporary_ok: bool = True) -> str | None:
    """One line for a Prefect API that PREFECT_API_URL names and nothing answers at (its server is down), or
    None for any other error.  ``temporary_ok``: the command could run on Prefect's temporary server instead
    (``schedule`` cannot), and the line says so.

    Prefect raises it through three chained tracebacks: as "Failed to reach
    API at URL" when a flow run starts, as httpx's ConnectError when
    ``serve`` registers a deployment.
    """
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith(UNREACHABLE):
        url = text.removeprefix(UNREACHABLE).strip()
    elif any(type(e).__name__ in ("ConnectError", "ConnectTimeout") and type(e).__module__.startswith("httpx")
             for e in exception_chain(exc)):
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if not url:  # no server named: not this problem
            return None
    else:
        return None
    return (f"cannot reach the Prefect API at {url} (PREFECT_API_URL): start its server (`prefect server start`)"
            + (", or unset PREFECT_API_URL to run on a temporary one" if temporary_ok else ""))


STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PATIENT_STARTUP_S = 120


@contextmanager
def _temporary_server_kept_quiet() -> Iterator[None]:
    """Prefect's temporary server given time to start, and no events sent where Prefect has no API to send them.

    Runs start beside others (an overlapping cron, a manual run, a test suite)
    on busy hosts; two starting at once were seen to fail with "Timed out while
    attempting to connect to ephemeral Prefect API server" after Prefect's
    default 20 s, so it gets :data:`PATIENT_STARTUP_S` unless the user set
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.

    A blank ``PREFECT_API_URL`` (``PREFECT_API_URL=`` in the environment, a
    profile or ``.env``) makes Prefect orchestrate on its temporary server, as
    no URL does, but its events worker (Prefect 3.9) then builds a client for
    the URL "" and fails at each event: "Service 'EventsWorker' failed" and
    a traceback per heartbeat on the console; one such run (CI, 2026-12-05)
    printed nothing more for 300 s after its second failure.  Events are only read by a
    server's automations, which a temporary server does not outlive, so there
    they are dropped (Prefect's ``NullEventsClient``).
    """
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    url = PREFECT_API_URL.value()
    blank = isinstance(url, str) and not url.strip()
    patient = {} if os.environ.get(STARTUP_TIMEOUT) else {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:
                                                          PATIENT_STARTUP_S}
    with temporary_settings(updates=patient):
        if blank:
            EventsWorker.set_client_override(NullEventsClient)
        try:
            yield
        finally:
            if blank:
                EventsWorker.set_client_override(None)


SETTINGS_PATH = "PREFECT_LOGGING_SETTINGS_PATH"
SETTINGS_SUFFIX = ".server-logging.yml"


def _prune_settings(folder: Path) -> None:
    """Remove the server logging settings a killed run left (``kill -9`` skips the ``finally`` that removes them):
    those whose run's process (the pid in ``<command>-<time>-<pid>.log``) is gone."""
    for stale in folder.glob(f"*.log{SETTINGS_SUFFIX}"):
        pid = stale.name[: -len(f".log{SETTINGS_SUFFIX}")].rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (PermissionError, OSError):  # another user's live process, or not ours to judge
            continue


@contextmanager
def _server_logs_to(path: Path) -> Iterator[None]:
    """Prefect's temporary server (a child process writing to this terminal) logs to the run's log file.

    Stopped at the command's exit while it still records the last task runs'
    states (a temporary database, thrown away with it), it printed "Error
    flushing 1 events" and two CancelledError tracebacks after a 500-input
    nightly run's report.  Its ``prefect.server``, ``uvicorn`` and ``fastapi``
    records now go to the log file, through a logging configuration made for it from Prefect's own
    (read once, at the server's start).  A user's own
    ``PREFECT_LOGGING_SETTINGS_PATH`` is left as it is.
    """
    if os.environ.get(SETTINGS_PATH):
        yield
        return
    import yaml
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    config = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    config["handlers"]["segflow_run_log"] = {"level": 0, "class": "logging.FileHandler", "filename": str(path),
                                             "delay": True, "encoding": "utf-8", "formatter": "standard"}
    for name in ("prefect.server", "uvicorn", "fastapi"):  # the server's own loggers, and its web framework's
        config["loggers"][name] = {**config["loggers"].get(name, {}), "handlers": ["segflow_run_log"],
                                   "propagate": False}
    settings = path.with_name(path.name + SETTINGS_SUFFIX)
    _prune_settings(path.parent)
    try:
        settings.write_text(yaml.safe_dump(config), encoding="utf-8")
    except OSError:  # no writable log folder (said once already): the server logs as Prefect has it
        yield
        return
    os.environ[SETTINGS_PATH] = str(settings)
    try:
        yield
    finally:
        os.environ.pop(SETTINGS_PATH, None)
        settings.unlink(missing_ok=True)


@contextmanager
def _console_to_log(command: str) -> Iterator[RunLog]:
    """The log file and the console filter of :func:`prefect_console`."""
    folder = log_dir()
    run_log = RunLog(folder / f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    root, segflow = logging.getLogger(), logging.getLogger("segflow")
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    quiet = ReportedElsewhere()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler | None = logging.FileHandler(run_log.path, delay=True, encoding="utf-8")
        handler.setFormatter(RunFormatter("%(asctime)s %(levelname)s %(name)s%(run)s: %(message)s"))
    except OSError as exc:  # no writable log folder: the console is still kept clear, and says so once
        handler = None
        print(f"warning: {folder}: cannot keep this run's log there ({exc.strerror or exc}); set {LOG_DIR_ENV} to "
              "a writable folder", file=sys.stderr)
    level = segflow.level
    for h in consoles:
        h.addFilter(quiet)
    if handler is not None:
        root.addHandler(handler)
        segflow.setLevel(logging.INFO)
    try:
        yield run_log
    finally:
        for h in consoles:
            h.removeFilter(quiet)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
            segflow.setLevel(level)


def prefect_api_configured(cwd: Path | None = None) -> bool:
    """Whether Prefect would report runs to an API (a server or Cloud) rather than start its temporary server.

    Reads what Prefect reads for ``PREFECT_API_URL``, in its order, without
    importing it: the environment, ``./.env``, ``./prefect.toml`` (``[api] url``),
    ``./pyproject.toml`` (``[tool.prefect.api] url``) and the active profile of
    the profiles file (``PREFECT_PROFILES_PATH``, else
    ``$PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``;
    ``PREFECT_PROFILE`` picks the profile).  An unreadable file counts as not
    configuring one, as Prefect ignores it too.
    """
    cwd = Path.cwd() if cwd is None else cwd
    if API_URL in os.environ:  # set, even to "": the environment wins over every file
        return bool(os.environ[API_URL].strip())
    dotenv = _dotenv(cwd / ".env")
    if API_URL in dotenv:
        return bool(dotenv[API_URL])
    for path, keys in ((cwd / "prefect.toml", ("api", "url")), (cwd / "pyproject.toml", ("tool", "prefect", "api", "url"))):
        value = _toml_value(path, keys)
        if value is not None:
            return bool(str(value).strip())
    return bool(str(_profile(cwd, dotenv).get(API_URL, "")).strip())


def _dotenv(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a ``.env`` file (quotes and ``export`` stripped); empty when absent."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        values[key.strip()] = value.split(" #", 1)[0].strip().strip("'\"")
    return values


def _toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _toml_value(path: Path, keys: tuple[str, ...]) -> Any:
    value: Any = _toml(path)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _profiles_path(cwd: Path, dotenv: dict[str, str]) -> Path:
    """Where Prefect reads profiles from (``prefect.settings.sources._get_profiles_path``, without test mode)."""
    given = (os.environ.get("PREFECT_PROFILES_PATH") or dotenv.get("PREFECT_PROFILES_PATH")
             or _toml_value(cwd / "prefect.toml", ("profiles_path",))
             or _toml_value(cwd / "pyproject.toml", ("tool", "prefect", "profiles_path")))
    if given:
        return Path(str(given)).expanduser()
    home = os.environ.get("PREFECT_HOME")
    return Path(home).expanduser() / "profiles.toml" if home else Path.home() / ".prefect" / "profiles.toml"


def _profile(cwd: Path, dotenv: dict[str, str]) -> dict[str, Any]:
    """The active profile's settings; Prefect's default profile (the temporary server) has no API URL."""
    data = _toml(_profiles_path(cwd, dotenv))
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profiles = data.get("profiles", {})
    return profiles.get(active, {}) if isinstance(profiles, dict) and isinstance(active, str) else {}


class _SubprocessInOwnSession:
    """The ``subprocess`` module, but ``Popen`` starts its process in a session of its own."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)


@contextmanager
def _temporary_server_in_its_own_session() -> Iterator[None]:
    """Prefect's temporary server (uvicorn, a child process) started in a session of its own: a terminal's Ctrl-C
    goes to the command's process group, and uvicorn, which handles SIGINT itself, shut down at once, so every
    API call of the run still under way failed (``httpx.ConnectError``, "Service 'EventsWorker' failed", tasks
    ``ClosedClientError``).  The command stops it at its exit (Prefect's atexit), the reaper if it is killed."""
    try:
        from prefect.server.api import server as api_server
    except ImportError:  # pragma: no cover - another Prefect layout: its server stays in the group
        yield
        return
    before = getattr(api_server, "subprocess", None)
    if before is not subprocess:
        yield
        return
    api_server.subprocess = _SubprocessInOwnSession()
    try:
        yield
    finally:
        api_server.subprocess = before
