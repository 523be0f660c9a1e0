"""Running a network over a batch of windows: device, precision, memory format.

A :class:`WindowPredictor` travels to Dask workers once (it is a single graph
key that every window task depends on) and prepares its network lazily on
first use there, so each worker process loads and converts the model once.
"""

from __future__ import annotations

import copy
import threading
from typing import Literal

import numpy as np
import torch
from torch import nn

Precision = Literal["exact", "fast"]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class WindowPredictor:
    """Blended class probabilities (softmax, float32, weighted) over the windows of a region.

    ``exact`` runs fp32; ``fast`` runs bf16 autocast on CPU (AMX) and fp16 AMP
    on CUDA.  Channels-last is used where it measured faster (convolutions on
    both CPU/oneDNN and CUDA/cuDNN).
    """

    def __init__(self, module: nn.Module, *, spatial_dims: int, num_classes: int,
                 precision: Precision = "exact", device: str = "auto", batch_size: int = 4,
                 token: str = "") -> None:
        self.module = module
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.token = token
        self._prepared: nn.Module | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prepared"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d

    def _network(self) -> tuple[nn.Module, torch.device]:
        dev = pick_device(self.device)
        with self._lock:
            if self._prepared is None:
                # a private copy: nn.Module.to() works in place, and the caller's module must not move
                net = copy.deepcopy(self.module).to(dev).eval()
                net = net.to(memory_format=self.memory_format)
                for p in net.parameters():
                    p.requires_grad_(False)
                self._prepared = net
        return self._prepared, dev

    def _probabilities(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        if self.precision == "fast":
            dtype = torch.bfloat16 if x.device.type == "cpu" else torch.float16
            with torch.autocast(x.device.type, dtype=dtype):
                logits = net(x)
        else:
            logits = net(x)
        if isinstance(logits, (tuple, list)):  # deep-supervision nets: the first head is the output
            logits = logits[0]
        return torch.softmax(logits.float(), dim=1)

    def accumulate(self, region: np.ndarray, windows: list[tuple[slice, ...]], weights: np.ndarray,
                   num_classes: int) -> np.ndarray:
        """Σ w·p over a (C, *extent) region for the given windows, in order, in batches.

        The region, the weights and the sums stay on the predictor's device; the
        sums come back once, as a (classes, *extent) float32 array.
        """
        net, dev = self._network()
        with torch.inference_mode():
            x = torch.from_numpy(region).to(dev)
            w = torch.tensor(weights, dtype=torch.float32, device=dev)
            acc = torch.zeros((num_classes,) + tuple(region.shape[1:]), dtype=torch.float32, device=dev)
            for i in range(0, len(windows), self.batch_size):
                batch = windows[i:i + self.batch_size]
                probs = self._probabilities(net, torch.stack([x[(slice(None),) + sl] for sl in batch]))
                for sl, p in zip(batch, probs):
                    acc[(slice(None),) + sl] += p * w
            return acc.cpu().numpy()
