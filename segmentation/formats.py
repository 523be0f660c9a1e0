"""Weight files in every common format, read without ever unpickling code.

Three formats are recognised by their *content*, never by their suffix:

- ``safetensors``: an 8-byte header length and a JSON header (segflow's own format);
- ``state_dict``: a ``torch.save`` checkpoint (zip with ``data.pkl``, or the legacy
  raw pickle), read only with ``torch.load(weights_only=True)``, whose restricted
  unpickler admits tensors and plain containers.  A pickle that names any other
  global (a function to call, a class to build) is refused with
  :class:`UnsafeModelError`; nothing in it runs.  Wrappers (``{"state_dict": ...}``,
  ``{"model": ...}``, ...) and DataParallel's ``module.`` prefix are removed;
- ``torchscript``: a ``torch.jit.save`` archive (a zip with ``code/`` and
  ``constants.pkl``).  Its compiled graph *is* the network: it runs as is, without
  the registry, and is loaded with TorchScript's own unpickler (no Python objects).
  segflow stores the model card inside the archive as the extra file ``card.json``.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import warnings
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from storage import jsontext
from storage.errors import ModelError, UnsafeModelError

WeightFormat = Literal["safetensors", "state_dict", "torchscript"]
EXTRA_CARD = "card.json"  # the extra file of a TorchScript archive that holds its segflow card

# Keys under which training code commonly nests the network's state_dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "network", "net", "weights")
_PICKLE_PROTOCOL_BYTE = 0x80
_MAX_SAFETENSORS_HEADER = 100 << 20


def detect_format(path: str | PathLike[str]) -> WeightFormat:
    """Which weight format a file holds, read from its first bytes and zip directory."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ModelError(path, f"cannot read weights: {exc.strerror or exc}") from None
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(path, f"damaged zip archive ({exc})") from None
        parts = [n.split("/", 1)[1] if "/" in n else n for n in names]
        if any(p.startswith("code/") for p in parts) or "constants.pkl" in parts:
            return "torchscript"
        if "data.pkl" in parts:
            return "state_dict"
        raise ModelError(path, "a zip archive that is neither a torch.save checkpoint nor a TorchScript archive")
    if head[:1] == bytes([_PICKLE_PROTOCOL_BYTE]):
        return "state_dict"  # torch.save's legacy (pre-1.6) format: a raw pickle stream
    raise ModelError(path, "not a weights file segflow reads (safetensors, PyTorch state_dict, TorchScript)")


def _unsafe_global(message: str) -> str | None:
    """The global a refused pickle asked for, from torch's weights-only unpickler message."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported (?:global|class)[: ]+([\w.]+)", message)
    return found.group(1) if found else None


def torch_load_safely(path: str | PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a pickle that would import or call anything is refused.

    The weights-only unpickler stops at the first global it does not allow,
    before building any object, so a refused payload has not run.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's "Detected pickle protocol 4 in the checkpoint" reached the terminal
            warnings.simplefilter("ignore", UserWarning)
            # a file object, not the path: torch hands a path named .safetensors to safetensors, whose error on a
            # pickle so named reached the terminal as a traceback; the weights-only unpickler names the payload
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported" in text:
            what = _unsafe_global(text)
            raise UnsafeModelError(path, (f"pickle payload imports {what!r}, which" if what else
                                          "a pickle payload that") + " a weights-only load refused; segflow never "
                                   "unpickles code "
                                   "(save the state_dict with torch.save(net.state_dict(), PATH), not pickle.dump, "
                                   "or use safetensors)") from None
        raise ModelError(path, f"not a readable PyTorch checkpoint ({' '.join(text.split())[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError,
            zipfile.BadZipFile) as exc:
        raise ModelError(path, f"not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None


def averaged_weights_note(obj: Any) -> str | None:
    """A note when a loaded checkpoint (:func:`torch_load_safely`) also holds averaged (EMA) weights beside the
    ones converted: ``state_dict`` and ``state_dict_ema``, ``model`` and ``ema`` were resolved to the plain ones
    without a word."""
    if not isinstance(obj, Mapping):
        return None
    averaged = [str(k) for k, v in obj.items() if "ema" in str(k).lower() and isinstance(v, Mapping) and v]
    if not averaged:
        return None
    taken = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    return (f"the checkpoint also holds averaged weights ({', '.join(averaged)}); the "
            f"{repr(taken) if taken else 'top-level'} weights were converted: to convert the averaged ones, save "
            "them alone (torch.save(ckpt[KEY], 'ema.pt')) and convert that file")


def unwrap_state_dict(obj: Any, path: str | PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: wrappers and DataParallel's ``module.`` prefix removed.

    Anything that is not, in the end, a flat mapping of names to tensors is
    refused: loading it would only fail later with a less useful message.
    """
    for _ in range(3):  # {"checkpoint": {"state_dict": {...}}} at most; deeper nesting is not a checkpoint
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelError(path, f"checkpoint holds a {type(obj).__name__}, not a state_dict of tensors")
    if not obj:
        raise ModelError(path, "checkpoint holds an empty state_dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            keys = ", ".join(map(repr, list(obj)[:4]))
            raise ModelError(path, f"checkpoint is not a state_dict of tensors: entry {key!r} holds a "
                                   f"{type(value).__name__} (top-level keys: {keys})")
        state[key] = value
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DistributedDataParallel, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | PathLike[str], *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors by name from a safetensors file, a torch.save checkpoint or (``trusted``) a TorchScript archive."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(path, f"not a readable safetensors file ({exc})") from None
    if fmt == "state_dict":
        return unwrap_state_dict(torch_load_safely(path), path)
    module, _ = load_torchscript(path, trusted=trusted)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_fits(state: Mapping[str, torch.Tensor], module: nn.Module, path: str | PathLike[str] | None,
               architecture: str, defaults_hint: bool = True) -> None:
    """Refuse weights whose names or shapes differ from the network's: never half-load.  Refuse NaN values too:
    such a network labels every pixel with one class (its NaN logits' argmax), which looked like a valid result
    ("ok", every hectare water); and infinite parameters, which end in NaN logits the same way.  Infinities in
    buffers are let be: a mask buffer may hold -inf on purpose."""
    from segmentation.models import NOT_MONAI_DEFAULTS

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # a bundle's network is built with MONAI's defaults pinned: segflow's own defaults are no lead there
    differ = NOT_MONAI_DEFAULTS.get(architecture) if defaults_hint else None
    hint = "" if differ is None else f"; segflow's defaults for {architecture!r} are {differ}: set them in " \
                                     "architecture.kwargs as the network was built"
    if missing or unexpected:
        raise ModelError(path, f"weights do not fit architecture {architecture!r}: "
                               f"{len(missing)} missing, {len(unexpected)} unexpected tensors"
                               + (f" (e.g. {(missing or unexpected)[0]})") + hint)
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(path, f"tensor {key} has shape {tuple(tensor.shape)}, "
                                   f"architecture expects {tuple(expected[key].shape)}"
                                   f"{_io_mismatch(state, module, expected) or hint}")
    check_no_nan(state, path, parameters={name for name, _ in module.named_parameters()})


def _io_mismatch(state: Mapping[str, torch.Tensor], module: nn.Module, expected: Mapping[str, torch.Tensor]) -> str:
    """What shape mismatches mean when they all come from another number of classes or of input channels than the
    card's (the hint on the architecture's defaults, shown otherwise, had hidden it); "" when they do not."""
    pairs = set()
    for key, tensor in state.items():
        got, want = tuple(tensor.shape), tuple(expected[key].shape)
        if len(got) != len(want):
            return ""
        pairs.update((g, w) for g, w in zip(got, want) if g != w)
    weights = [k for k, v in expected.items() if v.ndim >= 2]  # convolution and linear weights, in layer order
    if len(pairs) != 1 or not weights:
        return ""
    [(got, want)] = pairs

    def transposed(key: str) -> bool:  # a transposed convolution's weight is (in, out, *kernel)
        try:
            return isinstance(module.get_submodule(key.rsplit(".", 1)[0]), nn.modules.conv._ConvTransposeNd)
        except AttributeError:
            return False

    first, last = weights[0], weights[-1]
    out_axis, in_axis = (1 if transposed(last) else 0), (0 if transposed(first) else 1)
    if tuple(expected[last].shape)[out_axis] == want and tuple(state[last].shape)[out_axis] == got:
        return (f": the weights' network gives {got} outputs and the card lists {want} classes (the card's classes "
                "must be the network's outputs, in order)")
    if tuple(expected[first].shape)[in_axis] == want and tuple(state[first].shape)[in_axis] == got:
        return f": the weights' network takes {got} input channels and the card's input.channels is {want}"
    return ""


def check_no_nan(state: Mapping[str, torch.Tensor], path: str | PathLike[str] | None,
                 parameters: set[str] = frozenset()) -> None:
    """Refuse weights holding NaN, or an infinity in one of ``parameters`` (see :func:`check_fits`), naming the
    first such tensor."""
    bad = {key: int(torch.isnan(t).sum()) for key, t in state.items()
           if t.is_floating_point() and bool(torch.isnan(t).any())}
    if bad:
        first = next(iter(bad))
        raise ModelError(path, f"weights hold {sum(bad.values())} NaN value(s) in {len(bad)} tensor(s) (first: "
                               f"{first}); a diverged training run's? its labels would be meaningless")
    infinite = {key: int(torch.isinf(t).sum()) for key, t in state.items()
                if key in parameters and t.is_floating_point() and bool(torch.isinf(t).any())}
    if infinite:
        first = next(iter(infinite))
        raise ModelError(path, f"weights hold {sum(infinite.values())} infinite value(s) in {len(infinite)} "
                               f"parameter(s) (first: {first}); a diverged training run's? its labels would be "
                               "meaningless")


def fill(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | PathLike[str] | None,
         architecture: str, defaults_hint: bool = True) -> nn.Module:
    """Check then load ``state`` into ``module``; returns it in eval mode.

    A wrapper's attribute in front of every name (a Lightning module's ``model.``, a ``net.``) is dropped when the
    names then are exactly the network's: a MONAI UNet's own names start with ``model.`` too, so it is never
    dropped blindly (the refusal of such a checkpoint named a "missing" tensor that looked present)."""
    wanted = set(module.state_dict())
    heads = {k.split(".", 1)[0] for k in state}
    if set(state) != wanted and len(heads) == 1 and all("." in k for k in state):
        unwrapped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if set(unwrapped) == wanted:
            state = unwrapped
    state = _with_aliases(state, module)
    check_fits(state, module, path, architecture, defaults_hint)
    module.load_state_dict(dict(state))
    return module.eval()


def _with_aliases(state: Mapping[str, torch.Tensor], module: nn.Module) -> Mapping[str, torch.Tensor]:
    """``state`` with the names it lacks that are other names of a tensor it has, in ``module`` (one tensor reached
    under two names, as DynUNet's blocks are): safetensors' ``save_model`` writes each shared tensor once, and
    such a file had been refused as "32 missing" tensors, with a hint about the architecture's defaults."""
    own = module.state_dict()
    missing = set(own) - set(state)
    if not missing:
        return state
    names: dict[tuple, list[str]] = {}
    for key, tensor in own.items():  # one storage, offset, shape and stride: one tensor
        names.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                          tensor.stride()), []).append(key)
    filled = dict(state)
    for group in names.values():
        present = [k for k in group if k in state]
        for key in group:
            if key in missing and present:
                filled[key] = state[present[0]]
    return filled


class ScriptedNetwork(nn.Module):
    """A TorchScript module that can travel to Dask worker processes.

    ``ScriptModule`` objects cannot be pickled; this wrapper pickles as the
    archive's bytes and reloads them with ``torch.jit.load`` on the other side.
    """

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.script = script

    def forward(self, x: torch.Tensor) -> Any:  # noqa: D102
        return self.script(x)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        buf = io.BytesIO()
        torch.jit.save(self.script, buf)
        return _scripted_from_bytes, (buf.getvalue(),)


def _scripted_from_bytes(data: bytes) -> ScriptedNetwork:
    return ScriptedNetwork(torch.jit.load(io.BytesIO(data), map_location="cpu")).eval()


TORCHSCRIPT_UNTRUSTED = ("is a TorchScript archive: its graph is code, and loading it runs some of it (it can read "
                         "and write files); pass --trust-code (trust_bundle=True) if you trust where it came from")


def load_torchscript(path: str | PathLike[str], *,
                     trusted: bool) -> tuple[torch.jit.ScriptModule, dict[str, Any] | None]:
    """The archive's module (on CPU, eval mode) and its embedded card JSON, if segflow wrote one.

    Only ``trusted``: an archive's ``__setstate__`` methods run as it loads and its ``forward`` when checked, and
    TorchScript reaches the file system (``torch.from_file(..., shared=True)`` wrote a file under ``model
    inspect``).  Untrusted files are data, so an archive is refused as a bundle's expressions are.
    """
    path = Path(path)
    if not trusted:
        raise ModelError(path, TORCHSCRIPT_UNTRUSTED)
    extra = {EXTRA_CARD: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(path, f"not a loadable TorchScript archive ({' '.join(str(exc).split())[:200]})") from None
    raw = extra.get(EXTRA_CARD) or b""
    card = None
    if raw:
        try:
            card = jsontext.loads(raw)
        except ValueError:
            raise ModelError(path, f"the archive's {EXTRA_CARD} is not JSON") from None
    check_no_nan(module.state_dict(), path, parameters={name for name, _ in module.named_parameters()})
    return module.eval(), card


def save_torchscript(path: str | PathLike[str], module: torch.jit.ScriptModule, card_json: str) -> Path:
    """Write a TorchScript archive with the card embedded (the card cannot name the archive's own hash)."""
    path = Path(path)
    if isinstance(module, ScriptedNetwork):
        module = module.script
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(module, str(tmp), _extra_files={EXTRA_CARD: card_json.encode()})
    tmp.replace(path)
    return path
