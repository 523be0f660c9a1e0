"""A ``segflow segment`` run with or without Prefect: its logger, and whether a Prefect API is configured.

A one-off ``segflow segment`` with no Prefect API to report to runs its flow's
body as a plain function: Prefect's temporary server and flow-run bookkeeping
cost more than the work of a small input (docs/performance.md, block
``startup``).  Code shared by both ways logs through :func:`run_logger`, which
is Prefect's run logger inside a flow or task run and the ``segflow`` logger
outside one.  Nothing here imports Prefect unless it is already imported:
importing it costs 1-2 s, which the plain path exists to save.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

API_URL = "PREFECT_API_URL"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger in a flow or task run (its lines show in the UI), else the ``segflow`` logger."""
    if "prefect" in sys.modules:  # not imported: certainly not in a run
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            return get_run_logger()
    return logging.getLogger("segflow")


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
