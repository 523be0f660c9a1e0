"""Σ w·p kept on the worker's device from the windows to the labels: only labels (or probabilities) come back.

On a GPU worker an evaluate task's region sums are a device tensor, and so are
the pieces it hands its neighbours' chunks (a Dask worker passes task results
by reference within its process).  A chunk's finalise adds them there, divides
by Σ w and takes the argmax there, and copies back the labels (one byte a
pixel) or the probabilities it was asked for, instead of every region's float32
sums (20-33 MB each) and numpy passes on the host.  The arithmetic is the host
path's, in the same order: the sums and quotients equal numpy's bit for bit
(a softmax of blended logits within float32 rounding: the two libraries'
``exp`` differ), and the argmax takes the first maximum and passes NaN over as
:func:`storage.argmax.argmax_first` does (``tests/test_device_resident.py``
runs this path on the CPU against the host's).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

Box = tuple[tuple[int, int], ...]


def on_device(pieces: Sequence[tuple[Box, Any]]) -> bool:
    """Whether a chunk's pieces are device tensors (a device-resident run) rather than numpy arrays."""
    return bool(pieces) and isinstance(pieces[0][1], torch.Tensor)


def copy(piece: Any) -> Any:
    """A piece that does not keep its region's sums alive: a contiguous copy, numpy or torch."""
    return piece.clone() if isinstance(piece, torch.Tensor) else np.ascontiguousarray(piece)


def zeros(shape: Sequence[int], pieces: Sequence[tuple[Box, torch.Tensor]]) -> torch.Tensor:
    """Float32 zeros on the pieces' device, for a chunk's Σ w·p (``segmentation.stitching._sums`` adds them)."""
    return torch.zeros(tuple(shape), dtype=torch.float32, device=pieces[0][1].device)


def probabilities(acc: torch.Tensor, weight_sum: np.ndarray, mask: np.ndarray | None, logits: bool) -> np.ndarray:
    """Σ w·p / Σ w (a softmax after it when logits were blended), zero where the input has no data, to the host."""
    acc /= torch.from_numpy(weight_sum).to(acc.device)
    if logits:
        acc -= acc.amax(0, keepdim=True)
        acc.exp_()
        acc /= acc.sum(0, keepdim=True)
    if mask is not None:
        acc[:, ~torch.from_numpy(np.asarray(mask, dtype=bool)).to(acc.device)] = 0.0
    return acc.cpu().numpy()


def labels(acc: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """The argmax over classes on the device, first maximum winning, NaN never a maximum after the first class
    (:func:`storage.argmax.argmax_first`'s rule, a pass per class), to the host as ``dtype``."""
    best = acc[0].clone()
    out = torch.zeros(acc.shape[1:], dtype=torch.int32, device=acc.device)
    for c in range(1, acc.shape[0]):
        out.masked_fill_(acc[c] > best, c)
        torch.maximum(best, acc[c], out=best)
    return out.cpu().numpy().astype(dtype)


__all__ = ["copy", "labels", "on_device", "probabilities", "zeros"]
