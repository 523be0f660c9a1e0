"""Every architecture of the registry, 2D and 3D, trained on the demo task within a small CPU budget.

    .venv/bin/python benchmarks/zoo_training.py [--arch fcn ...] [--dims 2 3] [--record zoo-training]

For each architecture it swaps the demo card's network (land cover in 2D,
lesions in 3D; same inputs, classes, normalisation and training code), trains
on the demo's three training seeds with the demo's budget (steps, batch,
patch, learning rate; bf16 autocast; in 3D the demo's 32x48x48 patch, or the
smallest of 32x64x64 and 64³ the network accepts), and scores the Dice per class on two
held-out seeds it never saw, predicted with MONAI's sliding window. Issue 4's
goal: Dice >= 0.85. Both the mean over classes and the worst class are
reported, with training wall time, so a miss is visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from demo_training import predict, read_phantom, read_scene  # noqa: E402
from segmentation.card import Architecture  # noqa: E402
from segmentation.demo_cards import DEMO_BUDGET, landcover_card, lesion_card  # noqa: E402
from segmentation.metrics import dice_per_class  # noqa: E402
from segmentation.training import TrainingSample, train  # noqa: E402
from storage import samples  # noqa: E402

TRAIN_SEEDS = (1, 2, 3)
HELDOUT_SEEDS = (101, 102)

# Small widths: the point is that each family learns the task on a CPU, not a leaderboard.
ARCHS: dict[str, dict] = {
    "unet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1},
    "basic_unet": {"features": [16, 16, 32, 64, 128, 16]},
    "segresnet": {"init_filters": 16},
    "dynunet": {},
    "deeplabv3plus": {},
    "fcn": {},
    "pspnet": {},
}


ROIS_3D = ([32, 48, 48], [32, 64, 64], [64, 64, 64])  # the demo's first; larger only where a net needs it


def card_for(arch: str, dims: int, kwargs: dict, net: torch.nn.Module):  # noqa: ANN201
    from segmentation import models
    from storage.errors import ModelError

    base = landcover_card() if dims == 2 else lesion_card()
    update = {"name": f"{arch}-{dims}d", "architecture": Architecture(name=arch, kwargs=kwargs)}
    if dims == 3:
        for roi in ROIS_3D:
            try:
                models.check_roi(net, roi, arch)
                break
            except ModelError:
                continue
        update["inference"] = base.inference.model_copy(update={"roi": roi})
    return base.model_copy(update=update), DEMO_BUDGET[base.name], base.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply the demo's step budget")
    ap.add_argument("--threads", type=int, default=2)
    report.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from segmentation import models

    lines = ["| architecture | dims | parameters | steps × batch × patch | train s | Dice per class (mean of 2 "
             "held-out seeds) | mean | worst | goal ≥ 0.85 |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    misses = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data: dict[int, tuple[list, list]] = {}
        for dims in args.dims:
            make = ((lambda p, s: samples.make_scene(p.with_suffix(".tif"), seed=s)) if dims == 2
                    else (lambda p, s: samples.make_phantom(p.with_suffix(".nii.gz"), seed=s)))
            read = read_scene if dims == 2 else read_phantom
            data[dims] = ([read(*make(tmp / f"train{dims}-{s}", s)) for s in TRAIN_SEEDS],
                          [read(*make(tmp / f"held{dims}-{s}", s)) for s in HELDOUT_SEEDS])
        for arch in args.arch:
            for dims in args.dims:
                cin, classes = (4, 5) if dims == 2 else (1, 3)
                net = models.create(arch, spatial_dims=dims, in_channels=cin, out_channels=classes, **ARCHS[arch])
                card, budget, _ = card_for(arch, dims, ARCHS[arch], net)
                patch = tuple(card.inference.roi) if dims == 3 else budget.patch
                steps = max(1, int(budget.steps * args.steps_scale))
                params = sum(p.numel() for p in net.parameters())
                train_samples = [TrainingSample(image=i, labels=lab, ignore_index=samples.TRUTH_NODATA)
                                 for i, lab in data[dims][0]]
                t = time.perf_counter()
                result = train(card, train_samples, steps=steps, batch_size=budget.batch_size, patch=patch,
                               lr=budget.lr, seed=0, precision="fast")
                seconds = time.perf_counter() - t
                dices = []
                for image, labels in data[dims][1]:
                    pred = predict(card, result.module, image)
                    dices.append(dice_per_class(pred, labels, card.num_classes, ignore=samples.TRUTH_NODATA))
                per_class = {c.value: float(np.nanmean([d[c.value] for d in dices])) for c in card.classes}
                mean, worst = float(np.mean(list(per_class.values()))), min(per_class.values())
                ok = mean >= 0.85
                if not ok:
                    misses.append(f"{arch} {dims}D")
                text = ", ".join(f"{c.name} {per_class[c.value]:.3f}" for c in card.classes)
                lines.append(f"| {arch} | {dims}D | {params / 1e6:.2f} M | {steps} × {budget.batch_size} × "
                             f"{'×'.join(map(str, patch))} | {seconds:.0f} | {text} | {mean:.3f} | {worst:.3f} | "
                             f"{'met' if ok else 'missed'} |")
                print(lines[-1], flush=True)
    body = "\n".join([
        "Each architecture replaces the demo card's network: 2D trains on the land-cover scenes (4 bands, "
        "5 classes), 3D on the lesion phantoms (1 channel, 3 classes), with the demo's training code and "
        f"budget (bf16 autocast, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads). The goal is "
        "counted on the mean Dice over classes; the worst class is shown beside it.", "", *lines, "",
        f"Missed: {', '.join(misses)}." if misses else "Every architecture met the goal in every dimension run."])
    if args.record:
        report.record(args.record, body, doc=report.DOC.parent / "models.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
