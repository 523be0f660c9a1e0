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

# Quiet, offline-friendly defaults, set before Prefect is imported; the user's environment wins.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import sys  # noqa: E402

import typer  # noqa: E402

from flows.data_cli import info, ingest, verify  # noqa: E402
from flows.evaluate import evaluate_command  # noqa: E402  (issue 13; heavy imports inside it)
from flows.htmlreport import report_command  # noqa: E402  (issue 14)
from flows.model_cli import model_app  # noqa: E402
from flows.nightly_cli import nightly_command  # noqa: E402  (issue 5)
from flows.schedule import schedule_command  # noqa: E402  (issue 5)
from flows.segment_cli import segment  # noqa: E402
from flows.train_cli import demo, train  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Out-of-core, exactly stitched segmentation of large rasters and 3D volumes.")
app.add_typer(model_app, name="model")

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
