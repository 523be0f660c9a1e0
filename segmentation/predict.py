"""``segmentation.predict``: the one inference path the API, the CLI and the flows share."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Sequence

import dask.array as da
import numpy as np
from torch import nn

from segmentation import models
from segmentation.blending import Blend
from segmentation.inference import Precision, WindowPredictor
from segmentation.modeldir import LoadedModel
from segmentation.normalize import Normalizer, dtype_problem, resolve, statistics_for
from segmentation.precision import fast_cpu_dtype
from segmentation.stitching import StitchPlan
from segmentation.windows import make_grid
from storage.errors import ConfigError, IncompatibleInputError

DEFAULT_CHUNK = {2: 1024, 3: 128}


def as_dask(image: Any, chunks: Sequence[int] | int | None, spatial_dims: int) -> da.Array:
    """Wrap numpy, zarr or dask (C, *spatial) input with whole-channel, spatial chunks."""
    shape = tuple(image.shape[1:])
    if chunks is None:
        native = getattr(image, "chunksize", None) or getattr(image, "chunks", None)
        if isinstance(image, da.Array):
            chunks = image.chunksize[1:]
        elif native is not None and not isinstance(image, np.ndarray) and len(native) == len(shape) + 1:
            chunks = tuple(native[1:])
        else:
            chunks = DEFAULT_CHUNK[spatial_dims]
    if isinstance(chunks, int):
        chunks = (chunks,) * spatial_dims
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape))
    if isinstance(image, da.Array):
        return image.rechunk((image.shape[0],) + chunks)
    return da.from_array(image, chunks=(image.shape[0],) + chunks, asarray=False, lock=False)


def build_plan(image: Any, model: nn.Module | LoadedModel, *, roi: Sequence[int] | None = None,
               overlap: float | None = None, blend: Blend | None = None, sigma_scale: float | None = None,
               precision: Precision = "exact", chunks: Sequence[int] | int | None = None, mask: Any = None,
               batch_size: int | None = None, device: str = "auto", normalizer: Normalizer | None = None,
               num_classes: int | None = None, flip_tta: Sequence[int] | None = None,
               blend_outputs: str | None = None, compile: bool = False,
               one_process: bool | None = None) -> StitchPlan:
    """Resolve defaults from the model card, check the input fits, and build the stitching graph.

    ``image`` is (C, *spatial); a volume (C, K, J, I) as segflow stores a NIfTI.  ``mask`` (bool, *spatial): True
    where the image is valid; masked pixels get no label and the network sees 0 there.  No model space: the
    card's spacing, orientation and CRS are applied by ``flows.pipeline.segment_one``, not here.

    ``one_process``: whether the graph will run in one process (None: guessed from the current Dask client,
    :class:`segmentation.stitching.StitchPlan`); it decides only how the pieces reach their chunks."""
    if not isinstance(model, (nn.Module, LoadedModel)):  # a model folder's path: load_model(path) first
        raise ConfigError(None, f"model must be a torch module or segmentation.load_model(PATH), got "
                                f"{type(model).__name__}")
    if precision not in ("exact", "fast"):  # "bogus" ran as exact without a word
        raise ConfigError(None, f"precision must be 'exact' or 'fast', got {precision!r}")
    if type(image).__module__.startswith("torch"):
        raise ConfigError(None, "image is a torch tensor: give a numpy, zarr or dask array (tensor.cpu().numpy())")
    if not hasattr(image, "ndim") or not hasattr(image, "shape"):
        raise ConfigError(None, f"image must be a (C, *spatial) numpy, zarr or dask array, got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise ConfigError(None, f"image must be (C, *spatial) with 2 or 3 spatial axes, got shape {image.shape}")
    spatial_dims = image.ndim - 1
    roi = (roi,) * spatial_dims if isinstance(roi, (int, np.integer)) else roi
    _check_arguments(image, spatial_dims, roi=roi, overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                     chunks=chunks, mask=mask, batch_size=batch_size, device=device, normalizer=normalizer,
                     blend_outputs=blend_outputs, flip_tta=flip_tta, num_classes=num_classes)
    if isinstance(model, LoadedModel) and num_classes is not None and num_classes != model.card.num_classes:
        raise ConfigError(None, f"num_classes={num_classes}, and model {model.card.name!r} has "
                                f"{model.card.num_classes} classes (leave num_classes out for a loaded model)")
    if isinstance(model, LoadedModel):
        card = model.card
        if card.input.spatial_dims != spatial_dims:
            batch = card.input.spatial_dims == 2 and image.shape[1] == card.input.channels
            raise IncompatibleInputError(None, f"model {card.name!r} is {card.input.spatial_dims}D, "
                                               f"the input is {spatial_dims}D" + (
                                                   f" (shape {tuple(image.shape)}: a batch? predict takes one "
                                                   "(C, H, W) image at a time)" if batch else ""))
        if card.input.channels != image.shape[0]:
            last = image.shape[-1] == card.input.channels
            raise IncompatibleInputError(None, f"model {card.name!r} takes {card.input.channels} channels, "
                                               f"the input has {image.shape[0]}" + (
                                                   f" (shape {tuple(image.shape)}: channels last? predict takes "
                                                   "them first, np.moveaxis(image, -1, 0))" if last else ""))
        roi = card.inference.roi if roi is None else roi  # a numpy roi has no truth value
        overlap = card.inference.overlap if overlap is None else overlap
        blend = blend or card.inference.blend
        sigma_scale = sigma_scale or card.inference.sigma_scale
        batch_size = batch_size or card.inference.batch_size
        num_classes = card.num_classes
        flip_tta = card.inference.flip_tta if flip_tta is None else flip_tta
        blend_logits = (blend_outputs or card.inference.blend_outputs) == "logits"
        padding = {"padding": card.inference.padding, "padding_value": card.inference.padding_value}
        # the card is half the model: two with the same weights file and another activation or normalisation had
        # one dask name, and computed together gave the first one's probabilities for both
        module, token = model.module, f"{model.weights_sha256}-{model.card.shaping_sha256()[:16]}"
        if model.weights_changed():  # fine-tuned or reloaded in memory: the file's hash no longer names them
            token = None
    else:
        module, token, blend_logits = model, None, blend_outputs == "logits"
        padding = {}
    if roi is None:
        raise ConfigError(None, "roi is required when the model is a plain torch module")
    overlap = 0.25 if overlap is None else overlap
    blend = blend or "gaussian"
    sigma_scale = sigma_scale or 0.125
    batch_size = batch_size or 4
    flip_tta = tuple(sorted(set(flip_tta or ())))
    if any(not 0 <= a < spatial_dims for a in flip_tta):
        raise ConfigError(None, f"flip_tta axes {list(flip_tta)} must be spatial axes 0..{spatial_dims - 1}")
    roi = tuple(int(r) for r in roi)
    if len(roi) != spatial_dims:
        raise ConfigError(None, f"roi {list(roi)} has {len(roi)} axes, the image {spatial_dims} spatial axes")
    models.check_roi(module, roi, model.card.architecture.name if isinstance(model, LoadedModel) else "the network")
    arr = as_dask(image, chunks, spatial_dims)
    dmask = None
    if mask is not None:
        dmask = mask if isinstance(mask, da.Array) else da.from_array(mask, chunks=arr.chunksize[1:],
                                                                        asarray=False, lock=False)
        if dmask.shape != arr.shape[1:]:
            raise ConfigError(None, f"mask shape {dmask.shape} differs from the image's {arr.shape[1:]}")
    if normalizer is None:
        if isinstance(model, LoadedModel):
            norm = model.card.input.normalization
            normalizer = resolve(norm, arr.shape[0], statistics_for(norm, arr, dmask))
        else:
            normalizer = Normalizer((0.0,) * arr.shape[0], (1.0,) * arr.shape[0])
    if num_classes is None:  # a plain module's class count (and that it takes such a window) is learnt here
        num_classes, probabilities_out = _probed_classes(module, arr.shape[0], roi)
        if probabilities_out:  # it ends in a softmax: blended as they are, not softmaxed twice
            warnings.warn(f"the network: {models.PROBABILITIES_NOTE}", stacklevel=3)
            module = models.ProbabilitiesAsLogits(module)
    _two_classes_at_least(num_classes)
    if token is None:
        from dask.base import tokenize
        # the structure too (repr: activations, norms...) and the object: two networks sharing a state_dict but
        # not an activation had one key, and computed together both gave the first one's probabilities
        token = tokenize(*[p.detach().cpu().numpy() for p in module.state_dict().values()], type(module).__name__,
                         repr(module), id(module),
                         model.card.shaping_sha256() if isinstance(model, LoadedModel) else None)
    predictor = WindowPredictor(module, spatial_dims=spatial_dims, num_classes=num_classes,
                                precision=precision, device=device, batch_size=batch_size,
                                token=f"{token}-{precision}{_cpu_compute(precision)}-{device}-"
                                      f"tta{''.join(map(str, flip_tta))}"
                                      f"{'-logits' if blend_logits else ''}{'-compiled' if compile else ''}",
                                flip_tta=flip_tta, roi=roi, in_channels=arr.shape[0], blend_logits=blend_logits,
                                compile=compile, **padding)
    grid = make_grid(arr.shape[1:], roi, overlap)
    # a stored (zarr) or dask image is read by the evaluate tasks themselves, region by region (StitchPlan's
    # source): no image chunk waits in memory for the windows that need it.  A numpy image is in memory already.
    # An array-like that ``reads_regions`` (storage.modelview.WarpedImage) computes any region on demand: read the
    # same way, by the tasks, never as dask chunks.
    stored = image if not isinstance(image, (da.Array, np.ndarray)) and (
        hasattr(image, "store") or getattr(image, "reads_regions", False)) else \
        image if isinstance(image, da.Array) else None
    return StitchPlan(arr, predictor, grid, num_classes=num_classes, normalizer=normalizer, mask=dmask,
                      blend=blend, sigma_scale=sigma_scale, source=stored, one_process=one_process)


def _real(value: Any) -> bool:
    """A number as the arguments take one: not a string that ``float()`` would read, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(image: Any, spatial_dims: int, *, roi: Any, overlap: Any, blend: Any, sigma_scale: Any,
                     chunks: Any, mask: Any, batch_size: Any, device: str, normalizer: Any, blend_outputs: Any,
                     flip_tta: Any = None, num_classes: Any = None) -> None:
    """Every argument checked before a graph is built, each refusal a ``ConfigError`` saying what is wanted.

    Unchecked, ``batch_size=-1`` ran no window at all and returned all-zero probabilities (labels all class 0),
    a float ``mask`` of 0.3 counted every pixel as valid, ``blend_outputs="bogus"`` ran as probabilities,
    ``sigma_scale=0`` as 0.125, ``roi=(64.5, 64)`` as 64, and the rest failed deep in torch, MONAI or dask (as
    ``overlap="0.5"``, ``chunks=64.0`` and ``flip_tta=1`` still did, found by an API probe).
    """
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype.kind not in "biuf":
        raise ConfigError(None, f"image must hold real numbers (integer or float), got dtype {dtype}")
    if isinstance(image, da.Array) and any(np.isnan(c) for axis in image.chunks for c in axis):
        raise ConfigError(None, "the dask image has unknown chunk sizes: call image.compute_chunk_sizes() first")
    if roi is not None and (not hasattr(roi, "__iter__") or isinstance(roi, str)
                            or not all(_real(r) and float(r) == int(r) and int(r) >= 1 for r in roi)):
        raise ConfigError(None, f"roi must be positive whole numbers, one per spatial axis, got {roi!r}")
    if overlap is not None and not (_real(overlap) and 0.0 <= float(overlap) < 1.0):
        raise ConfigError(None, f"overlap must be a number in [0, 1), got {overlap!r}")
    if blend is not None and blend not in ("gaussian", "constant"):
        raise ConfigError(None, f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if blend_outputs is not None and blend_outputs not in ("probabilities", "logits"):
        raise ConfigError(None, f"blend_outputs must be 'probabilities' or 'logits', got {blend_outputs!r}")
    if sigma_scale is not None and not (_real(sigma_scale) and float(sigma_scale) > 0.0):
        raise ConfigError(None, f"sigma_scale must be a number > 0, got {sigma_scale!r}")
    if flip_tta is not None and (not hasattr(flip_tta, "__iter__") or isinstance(flip_tta, str)
                                 or not all(_whole(a) for a in flip_tta)):
        raise ConfigError(None, f"flip_tta must list spatial axes (e.g. [0, 1]), got {flip_tta!r}")
    if num_classes is not None and not (_whole(num_classes) and num_classes >= 1):
        raise ConfigError(None, f"num_classes must be a whole number >= 1, got {num_classes!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ConfigError(None, f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(None, f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if normalizer is not None and not callable(normalizer):
        raise ConfigError(None, f"normalizer must be a segmentation.normalize.Normalizer (callable), got "
                                f"{type(normalizer).__name__}")
    if chunks is not None:
        sizes = [chunks] if _whole(chunks) else chunks
        if isinstance(sizes, str) or not hasattr(sizes, "__iter__") or not all(_whole(c) and c >= 1 for c in sizes) \
                or (not _whole(chunks) and len(sizes) != spatial_dims):
            raise ConfigError(None, f"chunks must be a positive whole number or one per spatial axis "
                                    f"({spatial_dims}), got {chunks!r}")
    if mask is not None:
        kind = np.dtype(getattr(mask, "dtype", np.float64)).kind
        if kind not in "biu":
            raise ConfigError(None, f"mask must be boolean (True where the image is valid), got dtype "
                                    f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(getattr(mask, "shape", ())) != tuple(image.shape[1:]):
            raise ConfigError(None, f"mask shape {tuple(getattr(mask, 'shape', ()))} differs from the image's "
                                    f"{tuple(image.shape[1:])} (one value per pixel, no channel axis)")


def _cpu_compute(precision: str) -> str:
    """A ``fast`` plan's CPU dtype in its dask name: a plan made with bf16 and one made without never share keys."""
    return "-fp32" if precision == "fast" and fast_cpu_dtype() is None else ""


def _probed_classes(module: nn.Module, channels: int, roi: tuple[int, ...]) -> tuple[int, bool]:
    """The class count of a plain module's output for one window, checked: a wrong channel count or a dict output
    failed inside the tasks with a torch error (a given ``num_classes`` is taken at its word and not run here: the
    windows' tasks check it, :meth:`segmentation.inference.WindowPredictor._accumulate`).  Run in eval mode
    (:func:`segmentation.models.window_output`): a module left in train mode had its BatchNorm statistics updated
    by this probe, and the windows then ran with them (probabilities 0.036 off MONAI's on the same module in eval
    mode).  Also whether its outputs are probabilities already (:func:`segmentation.models.window_probe`)."""
    window = (1, channels, *roi)
    try:
        got, probabilities = models.window_probe(module, channels, roi)
    except Exception as exc:  # noqa: BLE001 - whatever the user's network raises, in one line
        raise ConfigError(None, f"the network fails on a {window} window: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(got, str) or len(got) != len(window) or got[2:] != roi:
        wrap = "; wrap it in a module whose forward returns the logits tensor (e.g. net(x)['out'] or net(x).logits)" \
            if isinstance(got, str) and got not in ("tuple", "list") else ""
        raise ConfigError(None, f"the network returns {got} for a {window} window; predict needs logits "
                                f"(1, classes, *roi) (or a tuple or list whose first item is){wrap}")
    return int(got[1]), probabilities


def _two_classes_at_least(num_classes: int) -> None:
    """A one-channel (sigmoid) network's softmax is 1 everywhere: every pixel came out class 0, without a word."""
    if num_classes < 2:
        raise ConfigError(None, f"the network gives {num_classes} class channel; predict takes the softmax over "
                                "classes (background included), so it needs 2 or more: for a sigmoid network, "
                                "return torch.cat([torch.zeros_like(x), x], 1) (2-class logits whose softmax is "
                                "the sigmoid)")


def predict(image: Any, model: nn.Module | LoadedModel, *, roi: Sequence[int] | None = None,
            overlap: float | None = None, blend: Blend | None = None, precision: Precision = "exact",
            chunks: Sequence[int] | int | None = None, mask: Any = None, probabilities: bool = True,
            **kwargs: Any) -> da.Array:
    """Sliding-window segmentation of a (C, *spatial) numpy, zarr or dask array.

    Returns a lazy dask array: class probabilities (classes, *spatial), or the
    argmax labels (*spatial) with ``probabilities=False``.  Compute it with any
    Dask scheduler; a distributed client spreads windows over its workers.
    A zarr or dask image is read region by region inside the tasks, so no
    image chunk waits in memory for the windows that need it (a dask image's
    graph is culled to each region and computed there: see
    :class:`segmentation.regions.ComputedRegion` for what that costs).

    One pass runs before it returns: a card whose normalisation needs the whole
    image's statistics (``image_zscore``, ``percentile``) has them computed here,
    chunk by chunk, so the call reads the image once more (the windows are
    normalised with the same numbers whatever the chunking).  Give
    ``normalizer=`` (e.g. a ``build_plan(...).normalizer`` kept from before) to
    skip it.
    """
    if not isinstance(probabilities, (bool, np.bool_)):  # "none", as the CLI spells labels only, gave probabilities
        raise ConfigError(None, f"probabilities must be True (class probabilities) or False (labels), got "
                                f"{probabilities!r}")
    dtype = getattr(image, "dtype", None)  # the values as given (the pipeline's note says it of a stored file)
    if isinstance(model, LoadedModel) and dtype is not None and kwargs.get("normalizer") is None and \
            (problem := dtype_problem(model.card, dtype)) is not None:
        warnings.warn(f"the image is {problem}", stacklevel=2)
    unknown = sorted(set(kwargs) - _PLAN_OPTIONS)
    if unknown:  # said as predict's own: build_plan's name in a TypeError meant nothing to the caller
        import difflib

        options = sorted(_PLAN_OPTIONS | {"roi", "overlap", "blend", "precision", "chunks", "mask", "probabilities"})
        near = difflib.get_close_matches(unknown[0], options, n=1)
        raise TypeError(f"predict() got an unexpected keyword argument {unknown[0]!r}"
                        + (f"; did you mean {near[0]!r}?" if near else f"; it takes {', '.join(options)}"))
    plan = build_plan(image, model, roi=roi, overlap=overlap, blend=blend, precision=precision,
                      chunks=chunks, mask=mask, **kwargs)
    return plan.probabilities() if probabilities else plan.labels()


# what predict passes on to build_plan as keywords
_PLAN_OPTIONS = frozenset(inspect.signature(build_plan).parameters) - {"image", "model"}
