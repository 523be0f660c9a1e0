"""What every ``segflow`` sub-command shares: the consoles, one-line failures and option parsing.

``flows/cli.py`` (the app) and the command modules it mounts
(``segment_cli``, ``train_cli``, ``data_cli``, ``model_cli``, ``nightly_cli``
and ``schedule``) all import from here and never from each other, so no
command module imports another in a circle.  Nothing here imports Prefect.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from storage.errors import SegflowError

if TYPE_CHECKING:
    from flows.config import SegmentOptions
    from flows.progress import Reporter

# emoji=False: a file named ":fire:.tif" was printed as "🔥.tif", naming a file that does not exist
console = Console(stderr=True, emoji=False)  # errors and progress: stderr, so stdout carries only results
out = Console(emoji=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """One red line on stderr and exit ``code``: how every bad argument or input ends a command."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def resumable_on_interrupt(out: "Path | str", again: str = "") -> Iterator[None]:
    """Ctrl-C (the terminal's, to the whole process group) or SIGTERM says what it left, and exits 130 or 143 as
    shells expect: the inputs in progress left nothing in ``out`` that looks complete, and the same command
    resumes them (typer alone exits 130 after a blank line; SIGTERM killed the command with nothing said).
    ``again``: what to add to the command (``segment``'s " with --skip-done", so the rerun keeps what is done).

    The signals are handled while the block runs (:func:`flows.interrupts.interrupt_handlers`): after the first,
    the consoles show no more library log records, so this line is the last and only thing said about it.
    """
    from flows.interrupts import exit_code, interrupt_handlers

    with interrupt_handlers():
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt) and type(exc).__name__ != "TerminationSignal":
                raise
            finished = getattr(exc, "finished", ())
            done = f"; done in this run: {', '.join(finished)}" if finished else ""
            console.print(f"[yellow]interrupted:[/yellow] the inputs in progress left nothing in {escape(str(out))} "
                          f"that looks complete (those already done are{escape(done)}); run the same command again"
                          f"{again} to resume them from their finished chunks", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(exc)) from None


def finish(code: int) -> NoReturn:
    """End a command that loaded torch and a model: exit ``code`` without the cyclic garbage collector walking
    every object of torch's and MONAI's thousands of modules at interpreter shutdown.

    ``gc.freeze()`` leaves reference cycles to the process's end; everything
    else is still released by reference counting as modules are torn down.
    Call it once the outputs are written and closed.  It took the exit of a
    process that loaded the demo model from about 1.5 s to 0.2 s on 2 cores.
    """
    import gc

    gc.freeze()
    raise typer.Exit(code)


# option fields whose flag is not their name with dashes
FLAGS = {"flip_tta": "--tta"}


def options(**fields: object) -> "SegmentOptions":
    """Validate run options at the edge; a bad one is a one-line error and exit 2."""
    from flows.config import SegmentOptions

    try:
        return SegmentOptions(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"]))
        # the flag as the user typed it (--simplify), not the field's name (simplify, output_grid); flip_tta is --tta
        flag = FLAGS.get(field) or f"--{field.replace('_', '-')}" if field in fields else field
        fail(f"invalid {flag}: {first['msg'].removeprefix('Value error, ')}")  # pydantic's wording, not the user's


def check_device(options: "SegmentOptions") -> None:
    """A CUDA device asked for on a machine without one, for work run here (not on a remote cluster's workers,
    which have their own devices): one line, exit 2, before anything starts."""
    if not options.device.startswith("cuda") or options.dask_address:
        return
    from segmentation.inference import pick_device
    from storage.errors import SegflowError

    try:
        pick_device(options.device)
    except SegflowError as exc:
        fail(str(exc))


def check_compile_cache(options: "SegmentOptions") -> None:
    """``--compile`` keeps its kernels in a folder (:func:`segmentation.netprep.compile_cache`): one that cannot
    be made or written is one line before the work, naming the setting (it had failed every input, each line
    naming the folder, not the input or SEGFLOW_COMPILE_CACHE)."""
    import os

    if not options.compile or options.dask_address:
        return
    from segmentation.netprep import compile_cache

    folder = compile_cache()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "not writable"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is not None:
        fail(f"--compile: cannot keep the compiled kernels in {folder} ({problem}); set SEGFLOW_COMPILE_CACHE to a "
             "writable folder")


def check_models(paths: "List[Path] | List[str]", trust_bundle: bool = False, *, load: bool = False,
                 roi: "List[int] | None" = None, bands: "List[str] | None" = None) -> None:
    """Refuse a bad model before any input is touched: one line, exit 2.

    ``load``: load it as the run will (weights read, hashed and fitted to the
    network; :func:`flows.routing.load_cached`, so the run gets this very
    object), not only its card: a truncated weights file is then this one
    line before Prefect or a run starts, not a traceback from inside a flow.
    A loaded model's window (``roi``, the ``--roi`` given, else the card's)
    is checked against the network too: a card's bad roi failed every input,
    each one's line blaming the input.  ``--roi`` and ``--bands`` must fit
    every model: a night with a 2D and a 3D model and a 2-axis ``--roi`` (or
    4 ``--bands`` and a 1-channel volume model) had failed every volume, every
    night, each line blaming the volume.
    """
    from flows.routing import load_cached
    from segmentation import models
    from segmentation.modeldir import check_model
    from storage.errors import ModelError

    several = len(paths) > 1
    try:
        for path in paths:
            if load:
                loaded = load_cached(path, trust_bundle=trust_bundle)
                card = loaded.card
            else:
                card = check_model(path, trust_bundle=trust_bundle)
            problem = options_problem(card, roi=roi, bands=bands, several=several)
            if problem is not None:
                raise ModelError(path, problem)
            if load:
                window = list(roi or card.inference.roi)
                try:
                    models.check_roi(loaded.module, window, card.architecture.name)
                except ModelError as exc:
                    where = "--roi" if roi else "its card's inference.roi"
                    raise ModelError(path, f"{where}: {exc.problem}") from None
    except SegflowError as exc:
        fail(str(exc))


def options_problem(card: Any, *, roi: "List[int] | None", bands: "List[str] | None", several: bool) -> str | None:
    """Why ``--roi`` or ``--bands`` cannot apply to the model of ``card``, or None."""
    dims, channels = card.input.spatial_dims, card.input.channels
    if roi is not None and len(roi) != dims:
        problem = f"--roi {','.join(map(str, roi))} has {len(roi)} axes, model {card.name!r} is {dims}D"
    elif bands is not None and len(bands) != channels:
        problem = (f"--bands {','.join(bands)} picks {len(bands)} band(s), model {card.name!r} takes {channels} "
                   f"channel(s)")
    else:
        return None
    if several:  # the options of a run go to every model it routes inputs to
        problem += "; --roi and --bands apply to every model of a run: run this model in a run of its own"
    return problem


class RateColumn(ProgressColumn):
    """Steps done per second (``3.1 chunks/s``), from rich's estimate over the last 30 s."""

    def render(self, task: Task) -> Text:
        from flows.progress import rate_text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        text = "" if not speed else rate_text(speed, 1.0, unit)
        return Text(text, style="progress.data.speed")


def progress(quiet: bool = False) -> Progress:
    """Bars for a terminal: what, how far, how fast, how long so far and about how long still."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                    disable=quiet or not console.is_terminal)


@contextmanager
def reporter(quiet: bool = False) -> Iterator["Reporter"]:
    """Install what a command shows while it works (:mod:`flows.progress`): bars on a terminal, plain lines in
    a log or CI (stderr not a terminal), warnings only with ``--quiet``."""
    from flows.progress import PlainReporter, QuietReporter, RichReporter, reporting

    if quiet:
        with reporting(QuietReporter(console)) as rep:
            yield rep
    elif console.is_terminal:
        with progress() as bars, reporting(RichReporter(bars)) as rep:
            yield rep
    else:
        with reporting(PlainReporter(console)) as rep:
            yield rep


def inform(text: str, quiet: bool = False) -> None:
    """An informational line on the console (not a result, not an error); nothing with ``--quiet``."""
    if not quiet:
        console.print(text, highlight=False, soft_wrap=True, markup=False)


def path_or_url(text: str) -> str:
    """A command-line input or output location: a URL as given (``Path`` would turn ``s3://b/k`` into
    ``s3:/b/k``), a local path normalised as ``Path`` does.  A ``file://`` URL is the local path it names: as a
    URL, an output there failed to upload ("FileNotFoundError") into a folder nothing had made."""
    from urllib.parse import unquote, urlparse

    from storage.remote import is_url

    if is_url(text) and text.lower().startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc in ("", "localhost"):
            return str(Path(unquote(parsed.path)))
    return text if is_url(text) else str(Path(text))


def check_out_folder(out: "str | Path") -> None:
    """A file where ``--out`` names a folder, or an output URL no installed filesystem serves, fails here, in one
    line, before a cluster or Prefect starts (they failed each input after its work)."""
    from storage.atomic import check_output_folder
    from storage.errors import SegflowError
    from storage.remote import is_url, protocol_problem

    if not str(out).strip():  # `--out "$OUT"` with OUT unset: the outputs went into the working directory
        fail("--out is empty: give the output folder (an unset variable in a script or a cron line?)")
    out = path_or_url(str(out))
    if is_url(out):
        problem = protocol_problem(out)
        if problem is not None:
            fail(f"{out}: {problem}")
        return
    try:
        check_output_folder(Path(out))
    except SegflowError as exc:
        fail(str(exc))


def check_report_file(path: Path, out: "str | Path") -> None:
    """``--report FILE``: a folder there (``--out`` itself included), or a folder that cannot be made for it,
    fails here, before the work (it was a traceback after every input had been segmented)."""
    from storage.atomic import make_output_folder
    from storage.errors import SegflowError

    if path.is_dir() or path.absolute() == Path(str(out)).absolute():
        fail(f"{path}: is a folder; --report names the JSON file to write")
    try:
        make_output_folder(path.parent)
    except SegflowError as exc:
        fail(str(exc))


def local_only(path: Optional[Path], flag: str) -> None:
    """Refuse a URL given where a command writes locally: the Path option turned ``s3://b/x`` into a folder named
    ``s3:`` in the working directory, and the command said it wrote there."""
    import re

    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]+):/+(.*)$", str(path)) if path is not None else None
    if match:  # shown as typed: Path collapsed its "//"
        fail(f"{flag} {match.group(1)}://{match.group(2)}: this command writes to a local path; URLs are for "
             "segment, nightly and schedule")


def ints(text: Optional[str], option: str = "--roi") -> Optional[list[int]]:
    """``128,128`` or ``128x128`` as integers; anything else is a one-line failure naming ``option``."""
    if not text:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:  # "x" or "," read as no numbers at all: as wrong as "a,b"
        fail(f"{option}: cannot read numbers from {text!r} (expected e.g. {'0,1' if option == '--tta' else '128,128'})")
    return values


__all__ = ["check_compile_cache", "check_device", "check_models", "options_problem", "check_out_folder",
           "check_report_file", "console", "fail", "finish", "ints", "local_only", "options", "out", "path_or_url",
           "progress", "resumable_on_interrupt", "inform", "reporter"]
