"""The engine behind ``segflow train``: arrays in, a trained network and its provenance out.

Inputs are array-likes (the CLI reads files into numpy/zarr arrays and
writes the model directory), so the same engine trains from a GeoTIFF, a
NIfTI or a zarr store. Inputs are only ever read patch by patch, and pixels
go through :func:`segmentation.normalize.resolve`, the very normaliser
inference uses, so a model sees the same numbers in training and in use.
Every ``val_every`` steps the network is scored on the validation images
(:mod:`segmentation.validation`); the best step's weights become the model,
and the whole run's state is written for ``resume``
(:mod:`segmentation.checkpoint`), the only files the engine itself writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from segmentation.augment import Augmentation
from segmentation.card import ModelCard
from segmentation.checkpoint import (CHECKPOINTS, LAST_FILE, ResumeState, check_same_run, load_state, save_state,
                                     save_tensors, state_path)
from segmentation.holdout import Holdout, Region, box_list
from segmentation.losses import IGNORE, MaskedDiceCELoss, supervised_loss
from segmentation.modeldir import LoadedModel, build_module, check_model_out, save_model
from segmentation.models import check_roi
from segmentation.normalize import statistics_for
from segmentation.patches import TrainingSample, check_shapes, prepare, sample_batch
from segmentation.precision import fast_cpu_dtype
from segmentation.trainreport import class_keys, per_class_rows, thin, write_reports
from segmentation.validation import ValidationScore, Validator
from storage.errors import ConfigError, InvalidInputError, ModelError

Precision = Literal["exact", "fast"]

@dataclass
class TrainingResult:
    """The trained network and what made it.

    ``module`` holds the best validated step's weights (the last step's when
    nothing was validated); ``last`` the last step's, kept beside them (None
    without validation, where they are ``module``'s).
    ``resume_state`` is removed once the model directory is written.
    """

    module: nn.Module  # eval mode, on the CPU, float32
    provenance: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # one per step
    last: dict[str, torch.Tensor] | None = None
    resume_state: Path | None = None


def _autocast(device: torch.device, precision: Precision) -> tuple[contextlib.AbstractContextManager, bool]:
    """The autocast context for this device and precision, and whether fp16 loss scaling is needed."""
    if precision == "exact":
        return contextlib.nullcontext(), False
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype == torch.float16
    dtype = fast_cpu_dtype()  # bf16 only where the CPU has it: emulated, it is slower than fp32
    return (torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()), False


def _compute(autocast: contextlib.AbstractContextManager) -> str:
    """What training computes in, for its provenance: a ``fast`` run on a CPU without bf16 says it ran fp32."""
    if isinstance(autocast, torch.autocast):
        return f"{str(autocast.fast_dtype).removeprefix('torch.')} autocast"
    return "float32"


def _memory_format(spatial_dims: int) -> torch.memory_format:
    # Measured on this project's 2-core AMX CPU (U-Net, bf16): channels-last is
    # clearly faster for 2-D convolutions and no faster for 3-D ones.
    return torch.channels_last if spatial_dims == 2 else torch.contiguous_format


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The loss curve as at most ``points`` [step, mean loss of the interval] pairs."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[int(b), round(float(np.mean(losses[a:b])), 5)] for a, b in zip(edges[:-1], edges[1:])]


def _split_holdout(card: ModelCard, samples: Sequence[TrainingSample],
                   holdout: Holdout) -> tuple[list[TrainingSample], list[TrainingSample], dict[str, Any]]:
    """Each sample cut into a training view and a validation view (no pixel copied).

    Both views normalise with the whole image's statistics, as inference on
    the whole image would.
    """
    train_views, val_views, boxes = [], [], []
    for s in samples:
        check_shapes(card, s)
        t_box, v_box = holdout.boxes(tuple(int(n) for n in s.labels.shape))
        stats = s.stats if s.stats is not None else statistics_for(card.input.normalization, s.image)
        train_views.append(TrainingSample(Region(s.image, t_box, 1), Region(s.labels, t_box), stats, s.ignore_index,
                                          s.name, None if s.valid is None else Region(s.valid, t_box)))
        val_views.append(TrainingSample(Region(s.image, v_box, 1), Region(s.labels, v_box), stats, s.ignore_index,
                                        s.name, None if s.valid is None else Region(s.valid, v_box)))
        boxes.append({"train": box_list(t_box), "validation": box_list(v_box)})
    return train_views, val_views, {"axis": holdout.axis, "fraction": holdout.fraction, "boxes": boxes}


def _card_identity(card: ModelCard) -> str:
    """What of the card shapes training (architecture, input, classes, ROI), hashed."""
    text = card.model_dump_json(include={"architecture", "input", "classes", "inference"})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _rounded(score: ValidationScore, keys: list[str]) -> dict[str, Any]:
    def r(v: float) -> float | None:
        return None if math.isnan(v) else round(float(v), 5)

    return {"dice": {k: r(score.dice[c]) for c, k in enumerate(keys)}, "mean_foreground": r(score.mean_foreground),
            "pixels": score.pixels}


def _restore(state: ResumeState, module: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
             scaler: Any, rng: np.random.Generator, device: torch.device) -> None:
    """Put weights, optimiser, schedule, loss scaler and both RNGs back where the saved step left them."""
    module.load_state_dict(state.module)
    optimizer.load_state_dict(state.optimizer)
    schedule.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    rng.bit_generator.state = state.numpy_rng
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(state.cuda_rng)


def _has_labels(sample: TrainingSample) -> bool:
    """Whether a validation sample has a pixel to score: with none, every validation is "n/a" and the first step
    validated won every tie, so the weights saved were an early step's, chosen by nothing."""
    labels = sample.labels
    if sample.ignore_index is None:
        return int(np.prod(labels.shape)) > 0
    step = max(1, (1 << 24) // max(1, int(np.prod(labels.shape[1:]))))  # about 16 M label values a read
    for start in range(0, int(labels.shape[0]), step):
        if np.any(np.asarray(labels[start:start + step]) != sample.ignore_index):
            return True
    return False


def train(card: ModelCard, samples: Sequence[TrainingSample], *, steps: int, batch_size: int,
          patch: Sequence[int] | None = None, lr: float = 2e-3, seed: int = 0,
          precision: Precision = "fast", log: Callable[[dict], None] | None = None,
          oversample: float = 0.5, validation: Sequence[TrainingSample] = (), holdout: Holdout | None = None,
          val_every: int | None = None, checkpoints: str | PathLike[str] | None = None,
          resume: bool = False, augment: Augmentation = Augmentation(), data: str | None = None,
          on_start: Callable[[], None] | None = None) -> TrainingResult:
    """Train the card's architecture from scratch on patches of ``samples``.

    AdamW with a one-cycle schedule (short budgets converge fastest with a
    warm-up then cosine decay), masked Dice + CE (over every head, for deep
    supervision), random flips, and ``oversample`` of the patches centred on
    a random foreground class so rare classes (roads, lesions) are seen
    often. ``precision="fast"`` trains (and validates) under bf16 autocast
    (about 3x faster than fp32 on AMX CPUs; fp32 on a CPU without bf16
    instructions, where bf16 is slower) or AMP on CUDA, fp32 otherwise.

    ``validation`` images, plus the held-out part of every sample when
    ``holdout`` is given, are scored every ``val_every`` steps (default:
    about 10 times per run) and at the last step; the best step's weights
    are returned. At the same steps the run's state is saved in
    ``checkpoints`` (a folder), from which ``resume=True`` continues as if
    never interrupted. ``log`` receives {step, steps, loss, lr, seconds}
    about 20 times per run, and with ``validation`` added after each
    validation. ``augment``: the shares of patches turned and scaled, and
    changed in contrast, brightness and noise, at random (:mod:`segmentation.augment`).
    """
    if steps < 1 or batch_size < 1:
        raise ConfigError(None, f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(None, f"the learning rate must be a positive number, got {lr}")
    if problem := augment.problem():
        raise ConfigError(None, problem)
    if precision not in ("exact", "fast"):  # "bogus" trained as fast without a word
        raise ConfigError(None, f"precision must be 'exact' or 'fast', got {precision!r}")
    if not 0.0 <= oversample <= 1.0:
        raise ConfigError(None, f"oversample is a share of the patches, in [0, 1], got {oversample}")
    if isinstance(samples, TrainingSample) or not all(isinstance(x, TrainingSample) for x in [*samples, *validation]):
        raise ConfigError(None, "samples and validation are lists of segmentation.training.TrainingSample")
    for x in [*samples, *validation]:  # float labels (a bilinearly resampled label map) were truncated to classes
        if np.dtype(x.labels.dtype).kind not in "iub":
            raise ConfigError(x.name, f"labels of dtype {x.labels.dtype}: a label map holds whole class numbers "
                                      "(resample label maps by nearest neighbour)")
    if not samples:
        raise ConfigError(None, "no training samples")
    if val_every is not None and val_every < 1:
        raise ConfigError(None, f"val_every must be positive, got {val_every}")
    if resume and checkpoints is None:
        raise ConfigError(None, "resume needs the checkpoints folder the interrupted run wrote")
    patch = tuple(int(p) for p in (patch if patch is not None else card.inference.roi))
    if len(patch) != card.input.spatial_dims:
        raise ConfigError(None, f"patch {patch} does not have {card.input.spatial_dims} axes")
    every_val = int(val_every) if val_every is not None else max(1, steps // 10)
    start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_samples, val_samples, held = list(samples), list(validation), None
    if holdout is not None:
        train_samples, held_views, held = _split_holdout(card, samples, holdout)
        val_samples += held_views
    for s in val_samples:
        check_shapes(card, s)
    preps = [prepare(card, s, rng) for s in train_samples]
    if not any(len(coords) for prep in preps for coords in prep.where.values()):
        names = sorted({s.name for s in train_samples if s.name})
        raise InvalidInputError(names[0] if len(names) == 1 else None,
                                "no labelled pixel to train on: every label pixel of the training part is the "
                                f"ignore value {train_samples[0].ignore_index} or lies where the image has no data")
    present = sorted({c for prep in preps for c, coords in prep.where.items() if len(coords)})
    if len(present) == 1 and card.num_classes > 1:  # trained without a word into a model that draws one class
        names = sorted({s.name for s in train_samples if s.name})
        only = next((c.name for c in card.classes if c.value == present[0]), None)
        raise InvalidInputError(names[0] if len(names) == 1 else None,
                                f"every labelled pixel of the training part is class {present[0]}"
                                + (f" ({only})" if only else "") + f" of the card's {card.num_classes}: a model "
                                "trained on it can only ever draw that class (are these the label files, and their "
                                "values the card's classes?)")
    if val_samples and not any(_has_labels(s) for s in val_samples):
        names = sorted({s.name for s in val_samples if s.name})
        raise InvalidInputError(names[0] if len(names) == 1 else None,
                                "no labelled pixel to validate on: every label pixel of the validation part is the "
                                f"ignore value {val_samples[0].ignore_index}, so no step could be chosen by it "
                                "(move --holdout, or give labelled validation data)")
    validator = Validator(card, val_samples, seed=seed) if val_samples else None
    keys = class_keys(card)

    fmt = _memory_format(card.input.spatial_dims)
    module = build_module(card).to(device).to(memory_format=fmt)
    try:  # a patch the network cannot take (33 for a stride-2 U-Net) failed at the first step with a torch error
        check_roi(module, list(patch), card.architecture.name)
    except ModelError as exc:
        raise ConfigError(None, f"patch {list(patch)}: {exc.problem}") from None
    module.train()
    loss_fn = MaskedDiceCELoss(card.num_classes, IGNORE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    # a tenth of the steps warm up, and at least two: with exactly one (--steps 10) the warm-up phase has length
    # 0 and OneCycleLR divided by it (a ZeroDivisionError traceback); from 20 steps on this is 0.1 as before
    warmup = max(0.1, 2 / steps) if steps >= 4 else 0.1
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=warmup, div_factor=10.0, final_div_factor=100.0)
    autocast, scale = _autocast(device, precision)
    compute = _compute(autocast)
    scaler = torch.amp.GradScaler("cuda") if scale else None
    run = {"card": _card_identity(card), "steps": steps, "batch_size": batch_size, "patch": list(patch), "lr": lr,
           "seed": seed, "precision": precision, "oversample": oversample, "val_every": every_val,
           **augment.run_fields(),  # only those on: older runs still resume
           "samples": [list(s.image.shape) for s in samples],
           "validation": [list(s.image.shape) for s in validation],
           "holdout": None if holdout is None else str(holdout),
           **({"data": data} if data is not None else {})}  # the files' identity: a resume on other data is refused
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    earlier = (0.0, 0.0)  # wall and CPU seconds of the runs this one resumes
    resumed: list[int] = []
    first = 1
    if resume:
        state = load_state(checkpoints)  # type: ignore[arg-type]
        check_same_run(checkpoints, state.run, run)  # type: ignore[arg-type]
        _restore(state, module, optimizer, schedule, scaler, rng, device)
        losses, history, best = list(state.losses), list(state.history), state.best
        best_weights = state.best_module if state.best_module is not None else (
            dict(state.module) if best is not None else None)
        earlier, resumed = (state.seconds, state.cpu_seconds), state.resumed + [state.step]
        first = state.step + 1

    if on_start is not None:  # the data and options are checked: what the caller says of the run is now true
        on_start()
    if resumed and log is not None:  # said once the saved state is known to be this run's (it had been said before)
        log({"resumed": first - 1, "steps": steps})
    every = max(1, steps // 20)
    for step in range(first, steps + 1):
        x, y = sample_batch(preps, patch, batch_size, oversample, rng, augment)
        x = torch.from_numpy(x).to(device).contiguous(memory_format=fmt)
        y = torch.from_numpy(y).to(device)
        with autocast:
            output = module(x)
        loss = supervised_loss(loss_fn, output, y, card.input.spatial_dims)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            # under bf16 a small network's gradients may turn NaN at a loss of 1.3, which no lower lr mends
            reduced = compute != "float32"
            hint = ("train in fp32 with precision 'exact' (--precision exact), or try a lower lr"
                    if reduced else "try a lower lr")
            raise ConfigError(None, f"training diverged at step {step} (loss {losses[-1]}"
                                    f"{', ' + compute.split()[0] if reduced else ''}); {hint}")
        entry = {"step": step, "steps": steps, "loss": losses[-1], "lr": schedule.get_last_lr()[0],
                 "seconds": round(earlier[0] + time.perf_counter() - start, 2)}
        if step % every_val == 0 or step == steps:
            if validator is not None:
                score = validator(module, device, autocast, fmt)
                history.append({"step": step, **_rounded(score, keys)})
                if best is None or score.score > best["score"]:
                    best = {"step": step, "score": score.score, **_rounded(score, keys)}
                    best_weights = _cpu_state(module)
                entry["validation"] = {**history[-1], "best_step": best["step"]}
            if checkpoints is not None:
                save_state(checkpoints, ResumeState(
                    step=step, module=_cpu_state(module), optimizer=optimizer.state_dict(),
                    scheduler=schedule.state_dict(), numpy_rng=rng.bit_generator.state,
                    torch_rng=torch.get_rng_state(), run=run, losses=losses, history=history, best=best,
                    best_module=None if best is None or best["step"] == step else best_weights,
                    scaler=None if scaler is None else scaler.state_dict(),
                    cuda_rng=list(torch.cuda.get_rng_state_all()) if device.type == "cuda" else [],
                    seconds=earlier[0] + time.perf_counter() - start,
                    cpu_seconds=earlier[1] + time.process_time() - cpu_start, resumed=resumed))
        if log is not None and (step % every == 0 or step == steps or "validation" in entry):
            log(entry)

    last = None  # without validation the last step is the model: nothing else to keep
    if best_weights is not None:
        last = _cpu_state(module)
        module.load_state_dict(best_weights)
    module = module.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
    tail = losses[-max(1, steps // 10):]
    import monai

    provenance = {
        "steps": steps, "batch_size": batch_size, "patch": list(patch), "lr": lr, "seed": seed,
        "precision": precision, "compute": compute, "device": device.type, "threads": torch.get_num_threads(),
        "optimizer": "AdamW(weight_decay=1e-4)", "schedule": "one-cycle",
        "loss": "dice+cross-entropy, ignore pixels masked", "oversample": oversample,
        "augmentation": augment.describe(card.input.spatial_dims),
        "ignore_index": sorted({s.ignore_index for s in samples if s.ignore_index is not None}),
        "final_loss": round(float(np.mean(tail)), 5), "loss_curve": _curve(losses),
        "seconds": round(earlier[0] + time.perf_counter() - start, 2),
        "cpu_seconds": round(earlier[1] + time.process_time() - cpu_start, 2), "num_samples": len(samples),
        "sample_shapes": [list(s.image.shape) for s in samples],
        "torch_version": torch.__version__, "monai_version": monai.__version__,
    }
    if _deep_supervision(card):
        provenance["deep_supervision"] = "heads weighted 1, 0.5, 0.25 ... (normalised); eval uses the main head"
    if held is not None:
        provenance["holdout"] = held
    if checkpoints is not None:
        provenance["checkpoint_every"] = every_val
    if resumed:
        provenance["resumed_from_steps"] = resumed
    if validator is not None and best is not None:
        provenance["validation"] = {
            "every": every_val, "regions": validator.describe(), "num_validation_images": len(validation),
            "precision": precision, "selection": "highest mean foreground Dice",
            "best": {k: v for k, v in best.items() if k != "score"}, "last": history[-1],
            "per_class": per_class_rows(card, history, best["step"]), "history": thin(history, best["step"]),
        }
    return TrainingResult(module=module, provenance=provenance, losses=losses, last=last,
                          resume_state=None if checkpoints is None else state_path(checkpoints))


def _deep_supervision(card: ModelCard) -> bool:
    return bool(card.architecture.kwargs.get("deep_supervision", False))


def save_trained(path: str | PathLike[str], card: ModelCard, result: TrainingResult) -> LoadedModel:
    """Write a model directory whose card carries the training provenance of its weights.

    ``weights.safetensors`` holds the best validated step, ``checkpoints/last.safetensors``
    the last one (when validated); the learning curve and the per-class validation table are
    written beside.
    Everything is written before the card, the commit point: a run killed just after it had left a directory
    that looked complete without its reports.  Once the card is in place the resume state is no longer needed.
    """
    path = Path(path)
    final = card.model_copy(update={"training": result.provenance})
    check_model_out(path, checkpoints=True)
    path.mkdir(parents=True, exist_ok=True)
    write_reports(path, final, result.losses)
    last = path / CHECKPOINTS / LAST_FILE
    if result.last is not None:
        save_tensors(last, result.last, {"step": str(result.provenance["steps"])})
    else:
        last.unlink(missing_ok=True)  # an earlier run's, not these weights' companion
    loaded = save_model(path, final, result.module)
    if result.resume_state is not None:
        result.resume_state.unlink(missing_ok=True)
    folder = path / CHECKPOINTS
    if folder.is_dir() and not any(folder.iterdir()):  # nothing validated, nothing to resume: no empty folder
        folder.rmdir()
    return loaded
