"""What a training run leaves for people to read: a learning curve and a per-class validation table.

The card's ``training`` dict is the record (machines read it); these are its
views: ``learning_curve.png`` (loss per step, validation Dice per class per
validation, the best step marked) and ``validation.md`` (Dice per class at
the best step, at the last step, and each class's own highest with its
step).  Both are drawn from the provenance and the per-step losses only, so
they can be redrawn from any model directory's card.
"""

from __future__ import annotations

import io
import math
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segmentation.card import ModelCard
from segmentation.modeldir import TRAINING_CURVE, VALIDATION_TABLE
from storage.atomic import write_text_atomically

CURVE_FILE = TRAINING_CURVE  # written before the card (segmentation.training.save_trained)
TABLE_FILE = VALIDATION_TABLE
HISTORY_LIMIT = 200  # validations kept in the card (the best and the last always among them)


def class_keys(card: ModelCard) -> list[str]:
    """How classes are named in scores: their names, or "value name" where names repeat."""
    names = [c.name for c in card.classes]
    if len(set(names)) == len(names):
        return names
    return [f"{c.value} {c.name}" for c in card.classes]


def thin(history: list[dict[str, Any]], best_step: int, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """At most ``limit`` evenly spread validations, always keeping the best and the last."""
    if len(history) <= limit:
        return list(history)
    keep = set(np.linspace(0, len(history) - 1, limit - 1).astype(int).tolist())
    keep |= {i for i, h in enumerate(history) if h["step"] == best_step}
    return [h for i, h in enumerate(history) if i in keep]


def per_class_rows(card: ModelCard, history: list[dict[str, Any]], best_step: int) -> list[dict[str, Any]]:
    """One row per class: Dice at the best step, at the last step, and the class's own highest and its step."""
    by_step = {h["step"]: h for h in history}
    rows = []
    for c, key in zip(card.classes, class_keys(card)):
        seen = [(h["dice"].get(key), h["step"]) for h in history if h["dice"].get(key) is not None]
        top = max(seen, key=lambda vs: (vs[0], -vs[1])) if seen else (None, None)
        rows.append({"class": c.name, "value": c.value, "at_best": by_step[best_step]["dice"].get(key),
                     "last": history[-1]["dice"].get(key), "highest": top[0], "highest_step": top[1]})
    return rows


def _cell(text: str) -> str:
    """A class name (read from a dataset's own files) made safe inside a Markdown table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def validation_markdown(card: ModelCard) -> str:
    """The per-class table of ``card.training["validation"]`` as Markdown."""
    training = card.training or {}
    val = training["validation"]
    best, last = val["best"], val["last"]
    regions = val["regions"]
    methods = sorted({r["method"] for r in regions})
    lines = [f"# Validation of {_cell(card.name)}", "",
             f"Best checkpoint: step {best['step']} of {training.get('steps')} (mean foreground Dice "
             f"{_fmt(best['mean_foreground'])}); its weights are `weights.safetensors`, the last step's "
             f"`checkpoints/last.safetensors`.",
             f"Validated every {val['every']} steps on {len(regions)} region(s) "
             f"({', '.join(methods).replace('_', ' ')}; {sum(r['pixels'] for r in regions)} pixels), "
             f"precision {val['precision']}, ignore pixels skipped."]
    if "holdout" in training:
        h = training["holdout"]
        lines.append(f"Spatial hold-out: the first {h['fraction']:g} of each image along {h['axis']} trains, "
                     "the rest validates.")
    lines += ["", f"| class | value | Dice at best (step {best['step']}) | last (step {last['step']}) "
                  "| highest | at step |", "|---|---|---|---|---|---|"]
    for row in val["per_class"]:
        at = "n/a" if row["highest_step"] is None else row["highest_step"]
        lines.append(f"| {_cell(row['class'])} | {row['value']} | {_fmt(row['at_best'])} | {_fmt(row['last'])} "
                     f"| {_fmt(row['highest'])} | {at} |")
    return "\n".join(lines) + "\n"


def learning_curve_png(card: ModelCard, losses: Sequence[float]) -> bytes:
    """Loss per step (with a running mean) and, when validated, Dice per class per validation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    val = (card.training or {}).get("validation")
    fig = Figure(figsize=(12 if val else 6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if val else 1, 1)
    steps = np.arange(1, len(losses) + 1)
    if len(losses):
        window = len(losses) // 25
        ax.plot(steps, losses, lw=0.6 if window > 1 else 1.4, alpha=0.45 if window > 1 else 1.0,
                color="tab:blue", label="loss per step")
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.6, color="tab:blue", label=f"mean of {window} steps")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (Dice + CE)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if val:
        ax2 = fig.add_subplot(1, 2, 2)
        history = val["history"]
        xs = [h["step"] for h in history]
        distinct = len({c.color for c in card.classes}) == len(card.classes)  # else matplotlib's own colours
        shown = 0
        for c, key in zip(card.classes, class_keys(card)):
            ys = [math.nan if h["dice"].get(key) is None else h["dice"][key] for h in history]
            if all(math.isnan(y) for y in ys):
                continue  # a class absent from every validation has no curve
            shown += 1
            ax2.plot(xs, ys, marker="o", ms=3, color=[v / 255 for v in c.color] if distinct else None,
                     label=c.name)
        ax2.axvline(val["best"]["step"], color="black", ls="--", lw=1, label=f"best (step {val['best']['step']})")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation Dice")
        ax2.set_title("validation Dice per class")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 + shown // 16,
                   frameon=False)
    fig.suptitle(card.name, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_reports(path: str | os.PathLike[str], card: ModelCard, losses: Sequence[float]) -> list[Path]:
    """``learning_curve.png`` and, when the run was validated, ``validation.md`` in the model directory."""
    path = Path(path)
    written = [_write_bytes(path / CURVE_FILE, learning_curve_png(card, losses))]
    if (card.training or {}).get("validation"):
        written.append(write_text_atomically(path / TABLE_FILE, validation_markdown(card), "validation table"))
    else:
        (path / TABLE_FILE).unlink(missing_ok=True)  # an earlier run's table would describe other weights
    return written
