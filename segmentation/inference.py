"""Running a network over a batch of windows: device, precision, memory format.

A :class:`WindowPredictor` travels to Dask workers once (it is a single graph
key that every window task depends on) and prepares its network lazily on
first use there, so each worker process loads and converts the model once.
"""

from __future__ import annotations

import copy
import itertools
import threading
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from segmentation.netprep import TRACING, compiled, fold_batch_norm, weights_layout
from segmentation.precision import autocast_dtype, fast_cpu_dtype
from storage.errors import ConfigError

Precision = Literal["exact", "fast"]


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: a GPU when there is one.  A CUDA device asked for where there is none is a ConfigError saying
    so (torch's own is an AssertionError, "Torch not compiled with CUDA enabled", from deep in a window task)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch finds no GPU"
            raise ConfigError(None, f"device {device!r} asked for, but {why} here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(None, f"device {device!r} asked for, but there are {torch.cuda.device_count()} GPU(s)")
    return dev


def exp_and_scale(logits: torch.Tensor, out: torch.Tensor,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax split in two factors, ``softmax(logits, 1) * weight == e * scale``.

    Written into a reused float32 buffer, class-major, in place: the plain
    ``torch.softmax(logits.float(), 1) * w`` allocates three window-batch-sized
    tensors and walks a 5-wide inner axis in channels-last order, which measured
    2.5x slower than this on the CPU (3D, 2 x 5 x 96^3).  Folding the weight
    into the per-voxel scale saves one more pass over the classes.
    """
    out.copy_(logits)  # dtype and memory format converted in one pass
    out.sub_(out.amax(1, keepdim=True)).exp_()
    total = out.sum(1, keepdim=True)
    scale = total.reciprocal_() if weight is None else torch.div(weight, total)
    return out, scale


# The most bytes of float32 probabilities :func:`softmax_slabs` makes at once: small enough to stay in a core's L2
# cache from the softmax to Σ w·p (one thread: 2-D 256² windows of 5 classes 0.60-0.65 ms per window with the whole
# batch at once, 0.49 one window at a time, 0.46-0.48 in slabs of 64-128 rows; 3-D 96³ 12.3 ms a window, 7.6-8.0
# in slabs of 2-6 planes)
SLAB_BYTES = 512 << 10


def softmax_slabs(logits: torch.Tensor, buf: torch.Tensor,
                  weight: torch.Tensor | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """:func:`exp_and_scale` of one window's logits (1, C, *roi) in slabs along its first spatial axis, each
    under :data:`SLAB_BYTES`: yields (first row, last row + 1, e, scale) per slab, e a view of ``buf``
    (>= (1, C, *roi) float32), valid until the next slab.  The values equal the whole window's, bit for bit (the
    softmax is per pixel)."""
    rows = logits.shape[2]
    step = max(1, SLAB_BYTES // (4 * logits[:, :, :1].numel()))  # float32 bytes of one row of every class
    for a in range(0, rows, step):
        b = min(a + step, rows)
        e, scale = exp_and_scale(logits[:, :, a:b], buf[:1, :, :b - a], None if weight is None else weight[a:b])
        yield a, b, e, scale


# stored dtypes torch has no full support for on every device, carried as the signed type of the same width
# and widened there (exactly: the bits are reinterpreted, then masked)
_WIDENED = {np.dtype(np.uint16): (np.int16, torch.int32, 0xFFFF),
            np.dtype(np.uint32): (np.int32, torch.int64, 0xFFFFFFFF)}
_AS_IS = {np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
                                 np.float64)}


def stored_on_device(dtype: np.dtype) -> bool:
    """Whether a region stored as ``dtype`` can go to the device as it is (else it is normalised on the host)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    return dtype in _AS_IS or dtype in _WIDENED


def to_device(raw: np.ndarray, dev: torch.device) -> torch.Tensor:
    """The stored values on ``dev``, in the stored dtype (uint16 and uint32 cross as int16 and int32 and are
    widened to int32 and int64 there): on CUDA from pinned memory, asynchronously, so the copy is a quarter
    (uint8) or half (uint16) of the float32 region's."""
    a = np.ascontiguousarray(raw)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    carried, wider, mask = _WIDENED.get(a.dtype, (None, None, 0))
    t = torch.from_numpy(a.view(carried) if carried is not None else a)
    if dev.type == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    elif dev.type != "cpu":
        t = t.to(dev)
    return t if wider is None else t.to(wider).bitwise_and_(mask)


# One gate per device in each worker process.  A GPU worker runs two window tasks at once (each asks for half a GPU,
# flows.cluster.GPU_TASK_SHARE): while one holds the gate and runs its windows on the device, the other reads and
# decodes its region on the host, so the device does not wait for the next region.  The gate keeps one region's
# activations on the device at a time, as a single task would.
_GATES: dict[str, threading.Lock] = {}
_GATES_LOCK = threading.Lock()


def device_gate(dev: torch.device) -> threading.Lock:
    """The lock window tasks take, in turn, to use ``dev``."""
    with _GATES_LOCK:
        return _GATES.setdefault(str(dev), threading.Lock())


_NUMPY_PADDING = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # torch's names -> numpy's


class WindowPredictor:
    """Blended class probabilities (softmax, float32, weighted) over the windows of a region.

    ``exact`` runs fp32; ``fast`` runs fp16 AMP on CUDA, and bf16 autocast on a
    CPU with bf16 instructions (fp32 on one without: segmentation.precision).
    Channels-last is used where it measured faster (convolutions on both
    CPU/oneDNN and CUDA/cuDNN).
    """

    def __init__(self, module: nn.Module, *, spatial_dims: int, num_classes: int,
                 precision: Precision = "exact", device: str = "auto", batch_size: int = 4,
                 token: str = "", flip_tta: Sequence[int] = (), roi: Sequence[int] | None = None,
                 in_channels: int | None = None, blend_logits: bool = False, compile: bool = False,
                 device_resident: bool | None = None, serial_device: bool | None = None,
                 padding: str = "constant", padding_value: float = 0.0) -> None:
        self.module = module
        # past the edge of an axis shorter than the ROI (the card's inference.padding): fill_outside
        self.padding, self.padding_value = padding, float(padding_value)
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.precision = precision
        # decided here, where the run is planned, and used by every worker (segmentation.precision)
        self.cpu_dtype = fast_cpu_dtype() if precision == "fast" else None
        self.device = device
        self.batch_size = batch_size
        self.token = token
        # the window shape, for checking BatchNorm folding on a probe (skipped when unknown)
        self.roi = None if roi is None or in_channels is None else tuple(int(r) for r in roi)
        self.in_channels = in_channels
        # MONAI's inferer blends raw network outputs (softmax after the blend); segflow's default blends
        # probabilities. Bundles ask for the former, so their labels match MONAI's exactly.
        self.blend_logits = blend_logits
        # every non-empty subset of the mirrored spatial axes, as tensor dims of a (N, C, *spatial) batch
        axes = [a + 2 for a in sorted(set(flip_tta))]
        self.flips = [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]
        self.compile = compile  # torch.compile (inductor); every batch padded to batch_size: one graph
        # regions go to the device in their stored dtype, are normalised there (accumulate_stored), and their sums
        # stay there until a chunk's labels (segmentation.devicesums); None: on every device but the CPU, where
        # numpy measured as fast or faster (True on the CPU runs the device path there, as the tests do)
        self.device_resident = device_resident
        # window tasks take turns on the device (device_gate); None: on every device but the CPU, whose threads
        # each run their own windows on their own cores
        self.serial_device = serial_device
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
    def pads_zeros(self) -> bool:
        """Whether windows see zeros past a short axis's edge (the region's buffer as it starts)."""
        return self.padding == "constant" and self.padding_value == 0.0

    def fill_outside(self, x: np.ndarray, inner: tuple[slice, ...]) -> None:
        """Fill a normalised (C, *extent) region past the image's ``inner`` part as MONAI pads an image whose
        axis is shorter than the ROI (each axis padded from the image, as ``torch.nn.functional.pad`` does)."""
        widths = [(0, 0)] + [(s.start, n - s.stop) for s, n in zip(inner, x.shape[1:])]
        if self.pads_zeros or not any(lo or hi for lo, hi in widths):
            return
        core = x[(slice(None),) + tuple(inner)]
        if self.padding == "constant":
            x[...] = np.pad(core, widths, mode="constant", constant_values=self.padding_value)
        else:
            x[...] = np.pad(core, widths, mode=_NUMPY_PADDING[self.padding])

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d

    def _network(self) -> tuple[nn.Module, torch.device]:
        dev = pick_device(self.device)
        with self._lock:
            if self._prepared is None:
                # a private copy: nn.Module.to() works in place, and the caller's module must not move
                net = copy.deepcopy(self.module).eval()
                if self.roi is not None:
                    probe = torch.rand((1, self.in_channels) + tuple(self.roi),
                                       generator=torch.Generator().manual_seed(0))
                    net = fold_batch_norm(net, probe)
                net = net.to(dev)
                weights = weights_layout(net)  # a 2-D network shown 3-D windows (segmentation.oneslice) has 4-D ones
                if weights is not None:
                    net = net.to(memory_format=weights)
                for p in net.parameters():
                    if p.is_leaf:  # a TorchScript module's copy holds non-leaf parameters, which refuse the call
                        p.requires_grad_(False)
                if self.compile:
                    net = compiled(net)
                self._prepared = net
        return self._prepared, dev

    def _logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._compiled_logits(net, x) if self.compile else self._forward(net, x)

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        with TRACING.forward():  # never during another thread's torch.fx trace (TracingGate)
            dtype = autocast_dtype(self.precision, x.device.type, self.cpu_dtype)
            if dtype is not None:
                with torch.autocast(x.device.type, dtype=dtype):
                    logits = net(x)
            else:
                logits = net(x)
        if isinstance(logits, (tuple, list)):  # deep-supervision nets: the first head is the output
            logits = logits[0]
        return logits

    def _compiled_logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The compiled network on a full batch (a short last one padded with zeros, its extra rows dropped), so
        one graph serves every batch."""
        n = x.shape[0]
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n,) + tuple(x.shape[1:]))])
        return self._forward(net, x)[:n]

    def _mirrored(self, net: nn.Module, xb: torch.Tensor, logits: torch.Tensor, out: torch.Tensor,
                  w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean softmax over the identity and every flip combination, weighted: (mean p, w)."""
        tmp = torch.empty_like(out)
        e, scale = exp_and_scale(logits, out)
        e.mul_(scale)
        for dims in self.flips:
            f, s = exp_and_scale(torch.flip(self._logits(net, torch.flip(xb, dims)), dims), tmp)
            e.addcmul_(f, s)
        e.mul_(1.0 / (len(self.flips) + 1))
        return e, w.expand((len(xb), 1) + tuple(w.shape))

    def _logit_sums(self, net: nn.Module, xb: torch.Tensor, logits: torch.Tensor, out: torch.Tensor,
                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs (mean over the flips when mirroring), weighted: (logits, w); softmax comes after the blend."""
        out.copy_(logits)
        for dims in self.flips:
            out.add_(torch.flip(self._logits(net, torch.flip(xb, dims)), dims))
        if self.flips:
            out.mul_(1.0 / (len(self.flips) + 1))
        return out, w.expand((len(xb), 1) + tuple(w.shape))

    @property
    def regions_on_device(self) -> bool:
        """Whether :func:`segmentation.stitching._evaluate` hands this predictor the stored region
        (:meth:`accumulate_stored`, whose sums stay on the device) rather than a normalised float32 one
        (:meth:`accumulate`, whose sums come back as numpy)."""
        if self.device_resident is not None:
            return self.device_resident
        return pick_device(self.device).type != "cpu"

    def _turn(self, dev: torch.device) -> ContextManager[Any]:
        """Hold the device for one region's windows (:func:`device_gate`), where window tasks take turns."""
        serial = dev.type != "cpu" if self.serial_device is None else self.serial_device
        return device_gate(dev) if serial else nullcontext()

    def accumulate(self, region: np.ndarray, windows: list[tuple[slice, ...]], weights: np.ndarray,
                   num_classes: int) -> np.ndarray:
        """Σ w·p over a (C, *extent) region for the given windows, in order, in batches.

        The region, the weights and the sums stay on the predictor's device; the
        sums come back once, as a (classes, *extent) float32 array.
        """
        net, dev = self._network()
        with self._turn(dev), torch.inference_mode():
            return self._accumulate(net, dev, torch.from_numpy(region).to(dev), windows, weights,
                                    num_classes).cpu().numpy()

    def accumulate_stored(self, raw: np.ndarray, normalizer: Any, inner: tuple[slice, ...], shape: Sequence[int],
                          finite: bool, windows: list[tuple[slice, ...]], weights: np.ndarray,
                          num_classes: int, invalid: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`accumulate` of a region sent in its stored dtype (:func:`to_device`) and normalised on the
        device (:meth:`segmentation.normalize.Normalizer.apply_torch`) into a (C, *shape) float32 region whose
        ``inner`` part it is (zeros elsewhere, where windows pass the image's edge); NaN and infinities become 0
        unless ``finite``, as on the host, and so do the ``invalid`` pixels of ``inner`` (the mask's).  The values
        equal the host path's bit for bit; the sums stay on the device, a tensor (:mod:`segmentation.devicesums`
        takes them from there)."""
        net, dev = self._network()
        with torch.inference_mode():
            stored = to_device(raw, dev)  # before its turn: the pinned copy is host work
        with self._turn(dev), torch.inference_mode():
            x = torch.zeros(tuple(shape), dtype=torch.float32, device=dev)
            normalizer.apply_torch(stored, x[(slice(None),) + tuple(inner)])
            if not finite:
                x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if invalid is not None:
                x[(slice(None),) + tuple(inner)][:, torch.from_numpy(invalid).to(dev)] = 0.0
            return self._accumulate(net, dev, x, windows, weights, num_classes)

    def _accumulate(self, net: nn.Module, dev: torch.device, x: torch.Tensor, windows: list[tuple[slice, ...]],
                    weights: np.ndarray, num_classes: int) -> torch.Tensor:
        """Σ w·p of the windows of a normalised region ``x`` already on the device, in batches (inside inference
        mode), on the device."""
        w = torch.tensor(weights, dtype=torch.float32, device=dev)
        acc = torch.zeros((num_classes,) + tuple(x.shape[1:]), dtype=torch.float32, device=dev)
        buf: torch.Tensor | None = None
        xbuf: torch.Tensor | None = None
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i:i + self.batch_size]
            if xbuf is None:  # the network's memory format from the start: one copy per window, not two
                # no larger than the region's windows: --batch-size 100000 had asked 26 GB for 9 windows
                shape = (len(batch), x.shape[0]) + tuple(s.stop - s.start for s in batch[0])
                xbuf = torch.empty(shape, dtype=x.dtype, device=dev, memory_format=self.memory_format)
            for j, sl in enumerate(batch):
                xbuf[j].copy_(x[(slice(None),) + sl])
            xb = xbuf[:len(batch)]
            logits = self._logits(net, xb)
            if logits.shape[1] != num_classes:  # a plain module's given num_classes: torch's shape error had said it
                raise ConfigError(None, f"num_classes={num_classes}, and the network returns {logits.shape[1]} "
                                        "channels for a window")
            # on the CPU, plain softmax blending goes slab by slab of each window (softmax_slabs): the probabilities
            # stay in the core's cache from the softmax to the sums, in a buffer of one window; a GPU takes the
            # batch in one launch per step
            slabs = not self.blend_logits and not self.flips and dev.type == "cpu"
            if buf is None:
                buf = torch.empty((1 if slabs else len(batch),) + tuple(logits.shape[1:]),
                                  dtype=torch.float32, device=dev)
            if slabs:
                for j, sl in enumerate(batch):
                    for a, b, e, scale in softmax_slabs(logits[j:j + 1], buf, w):
                        rows = slice(sl[0].start + a, sl[0].start + b)
                        acc[(slice(None), rows) + tuple(sl[1:])].addcmul_(e[0], scale[0])
                continue
            if self.blend_logits:
                e, scale = self._logit_sums(net, xb, logits, buf[:len(batch)], w)
            elif self.flips:
                e, scale = self._mirrored(net, xb, logits, buf[:len(batch)], w)
            else:
                e, scale = exp_and_scale(logits, buf[:len(batch)], w)
            for sl, ei, si in zip(batch, e, scale):
                acc[(slice(None),) + sl].addcmul_(ei, si)
        return acc
