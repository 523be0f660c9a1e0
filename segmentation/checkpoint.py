"""Resume state: everything a training run needs to continue as if never stopped.

At every validation the engine writes one file, ``checkpoints/resume.safetensors``:
the network's weights, the optimiser's moments, the best weights so far, the
torch RNG state as tensors, and in the safetensors header (JSON text) the
step, the scheduler, the numpy RNG state, the losses, the validation history
and what identifies the run.  One file renamed into place is atomic: an
interruption leaves the previous state or the new one, never a mix.  Reading
it executes nothing (safetensors for tensors, JSON for the rest; no pickle).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from storage.errors import ConfigError, InvalidInputError

CHECKPOINTS = "checkpoints"  # a model directory's folder for the resume state and the last step's weights
STATE_FILE = "resume.safetensors"
LAST_FILE = "last.safetensors"  # the last step's weights, beside the best ones the model directory holds
_META_KEY = "segflow_resume"
_FORMAT = 1


@dataclass
class ResumeState:
    """What :func:`save_state` writes and :func:`load_state` gives back."""

    step: int
    module: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch's optimizer.state_dict()
    scheduler: dict[str, Any]
    numpy_rng: dict[str, Any]  # numpy's bit_generator.state
    torch_rng: torch.Tensor
    run: dict[str, Any]  # what must be the same for a resumed run to be the same run
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {step, score, dice}
    best_module: dict[str, torch.Tensor] | None = None  # None while the best weights are ``module``
    scaler: dict[str, Any] | None = None
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    resumed: list[int] = field(default_factory=list)  # steps earlier runs resumed from


def state_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / STATE_FILE


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written under a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        with open(tmp, "rb+") as fh:  # on disk before it takes the name, so a crash cannot leave half a file
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_state(folder: str | os.PathLike[str], state: ResumeState) -> Path:
    tensors: dict[str, torch.Tensor] = {f"module/{k}": v for k, v in state.module.items()}
    if state.best_module is not None:
        tensors.update({f"best/{k}": v for k, v in state.best_module.items()})
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                plain_state.setdefault(str(index), {})[name] = value
    tensors["rng/torch"] = state.torch_rng
    for i, r in enumerate(state.cuda_rng):
        tensors[f"rng/cuda/{i}"] = r
    meta = {
        "format": _FORMAT, "step": state.step, "run": state.run, "losses": state.losses,
        "history": state.history, "best": state.best, "has_best_module": state.best_module is not None,
        "param_groups": state.optimizer["param_groups"], "optimizer_plain": plain_state,
        "scheduler": state.scheduler, "scaler": state.scaler, "numpy_rng": state.numpy_rng,
        "cuda_devices": len(state.cuda_rng), "seconds": state.seconds, "cpu_seconds": state.cpu_seconds,
        "resumed": state.resumed,
    }
    return save_tensors(state_path(folder), tensors, {_META_KEY: json.dumps(meta)})


def saved_step(folder: str | os.PathLike[str]) -> int | None:
    """The step of the resume state in ``folder`` from its header alone (no tensors read); None when there is
    none that reads."""
    try:
        with safe_open(str(state_path(folder)), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY) or "null")
        return int(meta["step"]) if isinstance(meta, dict) and meta.get("format") == _FORMAT else None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None


def load_state(folder: str | os.PathLike[str]) -> ResumeState:
    """The state :func:`save_state` wrote in ``folder``; a missing or foreign file is a one-line error."""
    path = state_path(folder)
    if not path.is_file():
        raise ConfigError(path, "no resume state here (the run never reached its first validation, or it "
                                "finished); train without --resume")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(path, f"unreadable resume state: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise InvalidInputError(path, "not a segflow resume state (or one from another segflow version)")

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in prefixed("optimizer/").items():
        index, name = key.split("/", 1)
        opt_state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_plain"].items():
        opt_state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return ResumeState(
        step=int(meta["step"]), module=prefixed("module/"),
        optimizer={"state": opt_state, "param_groups": groups}, scheduler=meta["scheduler"],
        numpy_rng=meta["numpy_rng"], torch_rng=tensors["rng/torch"], run=meta["run"],
        losses=[float(v) for v in meta["losses"]], history=meta["history"], best=meta["best"],
        best_module=prefixed("best/") if meta["has_best_module"] else None, scaler=meta["scaler"],
        cuda_rng=[tensors[f"rng/cuda/{i}"] for i in range(int(meta["cuda_devices"]))],
        seconds=float(meta["seconds"]), cpu_seconds=float(meta["cpu_seconds"]),
        resumed=[int(s) for s in meta["resumed"]])


RECORDED_SINCE = {"data"}  # run fields older states lack: not compared when the saved state has none


def check_same_run(folder: str | os.PathLike[str], saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume a state another configuration saved: its steps would not continue this run."""
    now = json.loads(json.dumps(now))  # tuples become lists, as they were saved
    for key in sorted(set(saved) | set(now)):
        if key in RECORDED_SINCE and key not in saved:  # a state saved before segflow recorded it
            continue
        if saved.get(key) != now.get(key):
            raise ConfigError(state_path(folder), f"was saved by a different run ({key}: {saved.get(key)!r} "
                                                  f"then, {now.get(key)!r} now); train without --resume to "
                                                  "start afresh")
