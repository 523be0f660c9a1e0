"""The ``segflow`` command: the typer ``app`` that mounts every sub-command, and ``main``.

Each command's body lives in the module of its concept (``flows/data_cli.py``:
ingest, info, verify; ``flows/segment_cli.py``; ``flows/train_cli.py``: train,
demo; ``flows/model_cli.py``: the ``model`` group; ``flows/nightly_cli.py``,
``flows/schedule.py``, ``flows/evaluate.py``, ``flows/htmlreport.py``); this
module only sets the quiet defaults and registers them, in the order
``segflow --help`` lists them.  The console script is ``flows.cli:app``.
"""

from __future__ import annotations

import os
import warnings

# Quiet, offline-friendly defaults, set before Prefect is imported; the user's environment wins.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# pydicom warns of each non-conforming value it reads (a 300-character SeriesDescription, an IS of '..') with a
# UserWarning from pydicom.valuerep that names neither the file nor anything to do, above segflow's own lines: the
# values are read as they are, and what matters segflow reports itself.  Worker processes get it by the environment.
# The same for pydicom.charset's "Found unknown escape sequence in encoded string value" (an ESC in a description).
_PYDICOM_VALUES = "ignore::UserWarning:pydicom.valuerep,ignore::UserWarning:pydicom.charset"
os.environ.setdefault("PYTHONWARNINGS", _PYDICOM_VALUES)
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.(valuerep|charset)")


def _writable_homes() -> None:
    """Prefect keeps its temporary server's database under ``PREFECT_HOME`` (``~/.prefect``), matplotlib its
    cache under ``~/.config/matplotlib``.  A service or cron account whose home cannot be written got 6,757
    lines of tracebacks from ``nightly`` and a two-minute wait before it failed (and two lines of matplotlib
    noise from ``segment``).  Where the user set neither and the default cannot be written, a folder of this
    user's in the temporary directory stands in (Prefect's temporary server keeps nothing a later run needs)."""
    import tempfile
    from pathlib import Path

    def usable(folder: Path) -> bool:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(folder, os.W_OK | os.X_OK)

    user = getattr(os, "getuid", lambda: "user")()
    try:
        home = Path.home()
    except (KeyError, RuntimeError):  # no HOME and no passwd entry
        home = Path("/nonexistent")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    for variable, default, name in (("PREFECT_HOME", home / ".prefect", "prefect"),
                                    ("MPLCONFIGDIR", config / "matplotlib", "matplotlib")):
        if os.environ.get(variable) or usable(default):
            continue
        stand_in = Path(tempfile.gettempdir()) / f"segflow-{name}-{user}"
        try:  # this user's own, private: another account could have made the name first in a shared /tmp
            stand_in.mkdir(mode=0o700, exist_ok=True)
            st = stand_in.lstat()
            mine = not stand_in.is_symlink() and st.st_uid == user
            if mine and st.st_mode & 0o077:
                stand_in.chmod(0o700)
        except (OSError, TypeError):
            mine = False
        os.environ[variable] = str(stand_in) if mine else tempfile.mkdtemp(prefix=f"segflow-{name}-")


_writable_homes()

import sys  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from flows.data_cli import info, ingest, verify  # noqa: E402
from flows.evaluate import evaluate_command  # noqa: E402  (issue 13; heavy imports inside it)
from flows.htmlreport import report_command  # noqa: E402  (issue 14)
from flows.model_cli import model_app  # noqa: E402
from flows.nightly_cli import nightly_command  # noqa: E402  (issue 5)
from flows.schedule import schedule_command  # noqa: E402  (issue 5)
from flows.segment_cli import segment  # noqa: E402
from flows.train_cli import demo, train  # noqa: E402

# typer vendors its own click (``typer._click``) and exports its UsageError only as BadParameter's base
_UsageError: type = typer.BadParameter.__base__


class _UsageLine(_UsageError):
    """A usage error in one line, like every other error segflow prints: click's own ran to four (the usage, the
    hint, a blank line, then the error), so in a log or a cron mail the error was not the first line."""

    def show(self, file=None) -> None:  # noqa: ANN001 (click's signature)
        hint = f"; see '{self.ctx.command_path} -h'" if self.ctx is not None else ""
        typer.echo(f"error: {self.format_message().rstrip('.')}{hint}", file=file, err=file is None)


class _Segflow(TyperGroup):
    """The top group: every usage error, the sub-commands' included (raised while they parse inside ``invoke``),
    comes out through ``_UsageLine``."""

    def make_context(self, *args, **kwargs):  # noqa: ANN002, ANN003 (click's signature)
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as error:
            raise _one_line(error) from None

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _UsageError as error:
            raise _one_line(error) from None


def _one_line(error: Exception) -> Exception:
    if isinstance(error, _UsageLine):
        return error
    line = _UsageLine(error.format_message(), error.ctx)
    line.exit_code = error.exit_code
    return line


# plain help (click's): rich's tables cut option names and paths at 80 columns ("--trust-bundle,--t…"), and
# a piped `--help` is 80 columns wide
app = typer.Typer(cls=_Segflow, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
                  help="Out-of-core, exactly stitched segmentation of large rasters and 3D volumes.")
app.add_typer(model_app, name="model")


def _print_version(value: bool) -> None:
    """What a bug report needs first: there had been no way to ask (``--version`` was "No such option")."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("segflow")
    except PackageNotFoundError:
        number = "unknown (run from a source tree that is not installed)"
    typer.echo(f"segflow {number}")
    raise typer.Exit()


@app.callback()
def _segflow(show_version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                               help="Print segflow's version and exit.")) -> None:
    pass

# the order `segflow --help` lists them in
app.command()(ingest)
app.command()(segment)
app.command()(train)
app.command()(info)
app.command()(verify)
app.command()(demo)
app.command("nightly")(nightly_command)
app.command("schedule")(schedule_command)
app.command("evaluate")(evaluate_command)
app.command("report")(report_command)


def main() -> None:  # pragma: no cover
    sys.exit(app())
