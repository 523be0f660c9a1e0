"""The ``segflow train`` and ``segflow demo`` commands: the ones that fit models.

Training has many options and a progress display with validation lines of
its own; ``demo`` trains two small models on generated data and reports their
held-out Dice.  Both live here, apart from the commands that use models
(``flows/segment_cli.py``) or read files (``flows/data_cli.py``), and
``flows/cli.py`` mounts them.  torch is imported inside the functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.markup import escape
from rich.table import Table

from flows import cliopts, cliutil
from storage.errors import SegflowError

console, out = cliutil.console, cliutil.out


def train(card: Path = typer.Option(..., "--card", help="A model card JSON (architecture, input, classes, ROI)."),
          image: Optional[List[Path]] = typer.Option(None, "--image", help="Training image: a raster, "
                                                                           "volume or a DICOM series' folder (repeat; "
                                                                           "pairs with --labels)."),
          labels: Optional[List[Path]] = typer.Option(None, "--labels", help="Label map on the image's grid (repeat)."),
          dataset: Optional[Path] = typer.Option(None, "--dataset", help="A dataset folder (VOC, Cityscapes, "
                                                                         "COCO, Decathlon/nnU-Net, raster + "
                                                                         "labels) instead of --image/--labels; "
                                                                         "its classes replace the card's."),
          out: Path = typer.Option(..., "--out", help="Model directory to write."),
          steps: int = typer.Option(300, help="Optimiser steps."),
          batch_size: int = typer.Option(8, help="Patches per step."),
          lr: float = typer.Option(2e-3, help="Learning rate."),
          seed: int = typer.Option(0, help="Random seed (sampling, initial weights, the validation split)."),
          precision: str = typer.Option("fast", help=cliopts.PRECISION_HELP[:-1] + ", training and validation."),
          val_fraction: Optional[float] = typer.Option(None, "--val-fraction",
                                                       help="Share of the cases that validate, seeded (default "
                                                            "0.2; a dataset's own val split wins)."),
          val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate (and save the resume state) "
                                                                            "every N steps (default: about 10 "
                                                                            "times per run)."),
          holdout: Optional[str] = typer.Option(None, "--holdout", help="AXIS:FRACTION, e.g. x:0.5: train on the "
                                                                        "first half of every image along x, "
                                                                        "validate on the rest (x:-0.5: train "
                                                                        "on the last half)."),
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from the state its "
                                                              "last validation saved in OUT/checkpoints."),
          augment_intensity: float = typer.Option(0.0, "--augment-intensity",
                                                  help="Share of patches (0-1) given a random contrast, "
                                                       "brightness and noise; flips always."),
          augment_spatial: float = typer.Option(0.0, "--augment-spatial",
                                                help="Share of patches (0-1) turned by a random angle (any in "
                                                     "2-D, ±15° in 3-D) and zoomed 0.8-1.25x."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors and notes only: no progress, no "
                                                                  "validation lines, no ok lines.")) -> None:
    """Train a card's architecture on image/label pairs or a dataset; the result is a model directory with
    provenance, the best validated weights, a learning curve and a per-class validation table."""
    from flows.interrupts import exit_code, interrupt_handlers
    from flows.training import train_from_dataset, train_from_files
    from segmentation.augment import Augmentation
    from segmentation.modeldir import check_model_out, read_card

    cliutil.local_only(out, "--out")
    image, labels = image or [], labels or []
    if dataset is not None and (image or labels):
        cliutil.fail("give either --dataset or --image/--labels, not both")
    if dataset is None and not image:
        cliutil.fail("nothing to train on: give --dataset PATH or --image/--labels pairs")
    if len(image) != len(labels):
        cliutil.fail(f"{len(image)} --image but {len(labels)} --labels: give them in pairs")
    for flag, value in (("--steps", steps), ("--batch-size", batch_size)):  # the core said "steps and batch_size"
        if value < 1:
            cliutil.fail(f"{flag} must be a positive number, got {value}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        cliutil.fail(f"--val-fraction must be in [0, 1), got {val_fraction:g}")
    if holdout is not None and val_fraction is not None:
        cliutil.fail("--holdout validates on part of every image; it cannot be combined with --val-fraction")
    if precision not in ("exact", "fast"):
        cliutil.fail(f"--precision {precision!r} is neither exact nor fast")
    for flag, share in (("--augment-intensity", augment_intensity), ("--augment-spatial", augment_spatial)):
        if not 0.0 <= share <= 1.0:
            cliutil.fail(f"{flag} {share:g} is not a share in [0, 1]")

    def tell(text: str) -> None:
        if not quiet:  # a scheduled retraining's log holds only what went wrong and the notes on its data
            console.print(text, highlight=False, soft_wrap=True, markup=False)

    def say(line: str) -> None:  # the notes on the training data are said even with --quiet
        if not quiet or line.startswith("note"):
            console.print(line, highlight=False, soft_wrap=True, markup=False)

    def on_step(info: dict) -> None:
        if "resumed" in info:  # which step it goes on from (it had said nothing until the next validation)
            tell(f"resuming from step {info['resumed']} of {info['steps']}, the state saved at its last validation")
            progress.update(task, completed=info["resumed"])
            return
        progress.update(task, completed=info["step"])
        if "validation" in info:
            v = info["validation"]
            # every class, as validation.md lists them: one absent from the validation data is "n/a", not left out
            scores = ", ".join(f"{k} {'n/a' if d is None else f'{d:.3f}'}" for k, d in v["dice"].items())
            mean = "n/a" if v["mean_foreground"] is None else f"{v['mean_foreground']:.3f}"
            tell(f"step {info['step']}: validation mean foreground Dice {mean} (best: step {v['best_step']}); "
                 f"{scores}")

    notes: list[str] = []  # said as the first step starts: a label file or --out refused had come after them
    if dataset is None and len(image) == 1 and holdout is None:  # nothing to hold out a fraction of
        why = "one image/label pair cannot be split by --val-fraction" if val_fraction else \
            "one image/label pair and no --holdout"
        notes.append(f"no validation: {why}; the weights will be the last step's (--holdout x:0.8 validates on "
                     "a fifth of the image)")

    def on_start() -> None:
        for text in notes:
            console.print(text, highlight=False, soft_wrap=True)
    try:
        check_model_out(out, checkpoints=True)
        model_card = read_card(card)
        common = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                      val_every=val_every, holdout=holdout, resume=resume, on_step=on_step,
                      augment=Augmentation(intensity=augment_intensity, spatial=augment_spatial), on_start=on_start)
        with interrupt_handlers(), cliutil.progress(quiet) as progress:  # SIGTERM as Ctrl-C: it had died saying nothing
            task = progress.add_task(f"train {model_card.name}", total=steps)
            if dataset is not None:
                from storage.datasets import open_dataset

                loaded = train_from_dataset(model_card, open_dataset(dataset), out, **common,
                                            val_fraction=0.2 if val_fraction is None else val_fraction,
                                            say=say)
            else:
                loaded = train_from_files(model_card, list(zip(image, labels)), out, **common,
                                          val_fraction=0.2 if val_fraction is None else val_fraction,
                                          say=say)
    except SegflowError as exc:
        cliutil.fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(out, steps, exit_code(exc))
    best = (loaded.card.training or {}).get("validation", {}).get("best")
    if best:
        tell(f"best validation: step {best['step']}, mean foreground Dice "
             f"{best['mean_foreground'] if best['mean_foreground'] is not None else 'n/a'}")
    tell(f"trained {loaded.name} -> {loaded.path} (weights sha256 {loaded.weights_sha256[:12]}…)")



def _interrupted(out: Path, steps: int, code: int = 130) -> NoReturn:
    """Ctrl-C or SIGTERM during training: what is saved, and the command that goes on from it (exit 130 or
    143)."""
    from segmentation.checkpoint import CHECKPOINTS, saved_step

    step = saved_step(out / CHECKPOINTS)
    if step is None:
        text = (f"training did not finish, so {out} holds no new model, and no validation was reached, so there "
                "is nothing to resume from: run the same command again to start over")
    else:
        text = (f"training did not finish, so {out} holds no new model; its state at the last validation (step "
                f"{step} of {steps}) is saved there: add --resume to the same command to go on from it")
    console.print(f"[yellow]interrupted:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def demo(workdir: Path = typer.Option(Path("demo/run"), "--workdir",
                                      help="A new folder for inputs, models and outputs, or an earlier demo's (they "
                                           "are replaced there); any other non-empty folder is refused."),
         workers: Optional[int] = typer.Option(None, help="Local Dask worker processes.")) -> None:
    """Generate sample data, train two small models, segment held-out inputs, report Dice."""
    from flows.demo import run_demo

    cliutil.local_only(workdir, "--workdir")
    try:
        with cliutil.reporter():  # one reporter for the whole demo: bars on a terminal, lines in a log
            summary = run_demo(workdir, workers=workers)
    except SegflowError as exc:
        cliutil.fail(str(exc))
    table = Table(title="segflow demo: held-out Dice per class")
    for col in ("model", "input", "class", "dice"):
        table.add_column(col)
    for row in summary["dice"]:
        table.add_row(row["model"], Path(row["input"]).name, row["class"], f"{row['dice']:.3f}")
    out.print(table)
    for key, value in summary["paths"].items():
        out.print(f"{key}: {value}")
    out.print(f"total {summary['seconds']:.1f} s")
    raise typer.Exit(0 if summary["ok"] else 1)
