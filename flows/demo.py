"""``segflow demo``: generated data in, trained models, segmented held-out inputs, Dice out.

Everything the demo needs is generated here: no download.  Held-out inputs use
seeds the models never saw in training.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.flows import batch_outcomes, segment_batch
from flows.progress import reporter
from flows.training import train_from_files
from segmentation.card import ModelCard
from segmentation.demo_cards import DEMO_BUDGET, landcover_card, lesion_card
from segmentation.metrics import ConfusionAccumulator
from storage import samples
from storage.errors import SegflowError

TRAIN_SEEDS = (1, 2, 3)
HELDOUT_SEEDS = (101,)
TARGET_DICE = 0.9


def _read_blocks(path: Path, truth: Path):  # noqa: ANN202
    """Yield (prediction, truth) blocks in the label files' own layout, never whole."""
    if path.name.endswith(".tif"):
        import rasterio

        with rasterio.open(path) as p, rasterio.open(truth) as t:
            for _, window in p.block_windows(1):
                yield p.read(1, window=window), t.read(1, window=window)
    else:
        import nibabel as nib

        p, t = nib.load(str(path)), nib.load(str(truth))
        for k in range(p.shape[2]):
            yield np.asarray(p.dataobj[..., k]), np.asarray(t.dataobj[..., k])


def dice_report(card: ModelCard, output: Path, truth: Path) -> list[dict[str, Any]]:
    acc = ConfusionAccumulator(card.num_classes, ignore=samples.TRUTH_NODATA)
    for pred, true in _read_blocks(output, truth):
        acc.update(pred, true)
    dice = acc.dice()
    return [{"model": card.name, "input": str(output), "class": c.name, "dice": float(dice[c.value])}
            for c in card.classes]


DEMO_MARKER = ".segflow-demo"  # written first into a demo's folder: only such a folder is ever emptied again


def claim_workdir(workdir: Path) -> None:
    """The demo replaces its folder's inputs/, models/ and outputs/: refuse a folder that is not a demo's (a
    user's project with folders of those names), and a file in the way."""
    if workdir.exists() and not workdir.is_dir():
        raise SegflowError(workdir, "is a file; --workdir names a folder for the demo")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / DEMO_MARKER).is_file():
        raise SegflowError(workdir, "is not empty and not a demo's folder; the demo would replace its inputs/, "
                                    "models/ and outputs/: give a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by segflow demo: its inputs/, models/ and outputs/ are replaced on a "
                                       "rerun\n")


def run_demo(workdir: Path, *, workers: int | None = None) -> dict[str, Any]:
    """The demo's steps, reported to the installed reporter (:mod:`flows.progress`): bars on a terminal, a line
    every few seconds in a log (training had shown nothing there for 14 minutes on a busy machine)."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    claim_workdir(workdir)
    inputs, models, outputs = workdir / "inputs", workdir / "models", workdir / "outputs"
    for d in (inputs, models, outputs):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    (inputs / "train").mkdir()
    # held-out inputs are larger than the training ones and cut into several chunks, so the demo
    # exercises the stitching across chunk borders
    jobs = [
        (landcover_card(), lambda p, s, big=False: samples.make_scene(
            p.with_suffix(".tif"), seed=s, **({"size": (1536, 1280)} if big else {})), "scene", 512),
        (lesion_card(), lambda p, s, big=False: samples.make_phantom(
            p.with_suffix(".nii.gz"), seed=s, **({"shape": (128, 112, 80)} if big else {})), "phantom", 48),
    ]
    summary: dict[str, Any] = {"dice": [], "paths": {}, "training_seconds": {}, "outcomes": []}
    ok = True
    with dask_client(None, workers=workers):
        for card, make, kind, chunk in jobs:
            train_pairs = [make(inputs / "train" / f"{kind}-{s}", s) for s in TRAIN_SEEDS]
            heldout = [make(inputs / f"{kind}-heldout-{s}", s, True) for s in HELDOUT_SEEDS]
            budget = DEMO_BUDGET[card.name]
            card_path = models / f"{card.name}.card.json"
            card_path.write_text(card.model_dump_json(indent=2))
            bar, key, done = reporter(), f"train-{card.name}", [0]
            bar.start(key, f"train {card.name}", total=budget.steps, unit="steps")

            def on_step(info: dict, bar: Any = bar, key: str = key, done: list = done) -> None:
                bar.advance(key, info["step"] - done[0])  # the engine reports every few steps
                done[0] = info["step"]

            t = time.perf_counter()
            model = train_from_files(card, train_pairs, models / card.name, steps=budget.steps,
                                     batch_size=budget.batch_size, lr=budget.lr, patch=budget.patch,
                                     on_step=on_step)
            bar.finish(key)
            summary["training_seconds"][card.name] = round(time.perf_counter() - t, 1)
            options = SegmentOptions(precision="fast", chunk_size=chunk, quicklook=True)
            state = segment_batch(inputs=[str(p) for p, _ in heldout], model_dir=str(model.path),
                                  out_dir=str(outputs), options=options, return_state=True)
            outcomes = batch_outcomes(state)
            summary["outcomes"].extend(outcomes)
            for (_, truth), outcome in zip(heldout, outcomes):
                if not outcome["ok"]:
                    ok = False
                    continue
                summary["dice"].extend(dice_report(card, Path(outcome["outputs"][0]), truth))
            summary["paths"][f"model {card.name}"] = str(model.path)
    summary["paths"]["inputs"] = str(inputs)
    summary["paths"]["outputs"] = str(outputs)
    summary["seconds"] = time.perf_counter() - t0
    summary["dice_target_met"] = all(r["dice"] >= TARGET_DICE for r in summary["dice"])
    summary["ok"] = ok
    (workdir / "demo-report.json").write_text(json.dumps(summary, indent=2))
    summary["paths"]["report"] = str(workdir / "demo-report.json")
    from flows.htmlreport import find_quicklooks, write_html_report

    page = write_html_report(summary, workdir / "demo-report.html", quicklooks=find_quicklooks(summary),
                             base=workdir)
    summary["paths"]["html report"] = str(page)
    if not ok:
        raise SegflowError(workdir, "the demo's segmentation failed: see demo-report.json")
    return summary

