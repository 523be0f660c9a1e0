"""Preparing a network for windows: BatchNorm folded, weights laid out channels-last, compiled on request.

What :class:`segmentation.inference.WindowPredictor` does once per worker process to the network it was
given, before the first window: torch.fx traces fold eval-mode BatchNorm into the convolution before it (never
while another thread of the process runs a forward pass: :data:`TRACING`), the weights take the channels-last
layout of their own rank, and ``--compile`` hands the result to torch.compile with a cache that persists between
runs.  Split from :mod:`segmentation.inference`, which runs the prepared network over batches of windows.
"""

from __future__ import annotations

import copy
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

__all__ = ["TRACING", "TracingGate", "compile_cache", "compiled", "fold_batch_norm", "weights_layout"]


class TracingGate:
    """Forward passes and torch.fx traces, never at once in one process.

    A symbolic trace patches ``nn.Module.__call__`` for the whole process while it runs: another thread's forward
    pass then goes through the tracer and fails (``NameError: module is not installed as a submodule``).  With
    ``nightly --parallel N`` one input's window task folded its network (:func:`fold_batch_norm`) while another's
    windows ran in the same worker, and inputs failed at random (2 runs of 5).  Forward passes share the gate; a
    trace waits for the running ones and holds new ones back while it lasts (milliseconds, once per network).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False
        self._waiting = 0  # traces waiting: new forward passes wait behind them (a busy worker starved them)

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cond:
            while self._tracing or self._waiting:
                self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

    @contextmanager
    def trace(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._tracing or self._running:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


TRACING = TracingGate()


def fold_batch_norm(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution before it, where that provably changes nothing.

    The folded network computes the same function (fp32 results differ by
    rounding, ~1e-7) and measured 1.1-1.5x faster on this CPU for MONAI's
    U-Net (``benchmarks/compile_modes.py``).  torch.fx traces symbolically, and
    a trace can be silently wrong: MONAI's BasicUNet guards its skip
    concatenation with ``torch.jit.isinstance``, which is False for a trace
    proxy, so the traced graph drops the skips.  Hence the folded network is
    run on ``example`` and kept only if it agrees with the original; networks
    that cannot be traced, or disagree, run unchanged.

    torch.fx's ``fuse`` folds BatchNorm after a plain convolution only; MONAI's
    U-Net puts one after each transposed convolution of its decoder too, and
    in eval mode its Dropout layers return their input: those are folded and
    dropped here (:func:`_fold_transposed`, :func:`_drop_identities`).  On the
    demo's land-cover U-Net the three BatchNorms left took 4.1 of 39 s of a
    16384² run's forward passes (py-spy, 2026-12-04).
    """
    if isinstance(net, torch.jit.ScriptModule) or not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return net
    from torch.fx.experimental.optimization import fuse

    try:
        with TRACING.trace():  # no forward pass of another thread while torch.fx patches the process
            folded = fuse(copy.deepcopy(net), inplace=True)
        _fold_transposed(folded)
        _drop_identities(folded)
        folded.graph.lint()
        folded.delete_all_unused_submodules()  # the folded BatchNorms
        folded.recompile()
        with torch.inference_mode():
            want, got = net(example), folded(example)
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4 * (1 + float(want.abs().max()))):
            return folded
    except Exception:  # noqa: BLE001 - any tracing failure means: keep the eager network
        pass
    return net


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _fold_transposed(gm: torch.fx.GraphModule) -> None:
    """Fold each eval-mode BatchNorm whose input is a transposed convolution used by nothing else into it
    (``torch.nn.utils.fusion.fuse_conv_bn_eval`` with ``transpose=True``; ungrouped convolutions only)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn, source = modules[node.target], node.args[0] if node.args else None
        if bn.training or bn.running_mean is None or not isinstance(source, torch.fx.Node) or \
                source.op != "call_module" or len(source.users) != 1:
            continue
        conv = modules.get(source.target)
        if not isinstance(conv, _TRANSPOSED) or conv.groups != 1 or conv.training:
            continue
        _set_module(gm, source.target, fuse_conv_bn_eval(conv, bn, transpose=True))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)


def _drop_identities(gm: torch.fx.GraphModule) -> None:
    """Remove the calls of modules that return their input in eval mode (Dropout, Identity)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)) and \
                not m.training and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _set_module(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def compile_cache() -> Path:
    """Where torch.compile keeps its generated kernels between runs: ``$SEGFLOW_COMPILE_CACHE``, else
    ``~/.cache/segflow/torch-compile``."""
    return Path(os.environ.get("SEGFLOW_COMPILE_CACHE") or Path.home() / ".cache" / "segflow" / "torch-compile")


def compiled(net: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor, static shapes) with inductor's caches in :func:`compile_cache`: the first run
    on a machine generates and builds the kernels; later runs (other processes) load them and only trace.

    Opt-in (``--compile``): it measured 1.82x eager in fp32 2D (1.62x BatchNorm-folded eager) and nothing
    in bf16 (``benchmarks/compile_modes.py``), and inductor's kernels sum in another order than eager, so
    probabilities move in the last float bits (tests hold them within 1e-4).
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache()))
    compile_cache().mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    return torch.compile(net, dynamic=False)


def weights_layout(net: nn.Module) -> torch.memory_format | None:
    """The channels-last layout of a network's convolution weights (None: mixed ranks, or none to lay out)."""
    ranks = {p.dim() for p in net.parameters()} & {4, 5}
    return None if len(ranks) != 1 else torch.channels_last if ranks == {4} else torch.channels_last_3d
