"""What a run says about an input it segments, beyond its labels: refusals of inputs with nothing to segment, and
the warnings kept in the provenance (no CRS, bands taken in file order, a dtype the normalisation may not suit, a
DICOM slice's guessed depth, valid pixels a CRS change left unlabelled).  Each is one line naming the input, said
once and recorded, so nothing segflow assumed or could not do is silent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from distributed import Client

from flows import modelspace
from flows.config import SegmentOptions
from flows.progress import say
from segmentation import LoadedModel
from storage.errors import InvalidInputError
from storage.layout import MASK, ImageStore


def check_has_data(input_path: Path, store: ImageStore) -> None:
    """Refuse an input with no valid pixel at all: its output would be nodata everywhere, hiding the problem."""
    mask = store.mask
    if mask is None:
        return
    # the mask's fill value is False and all-False chunks are never stored: no stored chunk, no valid pixel
    if mask.nchunks_initialized == 0 or not any(bool(np.asarray(mask[b]).any()) for b in _mask_blocks(mask)):
        geometry = store.meta.geometry
        nodata = getattr(geometry, "nodata", None)
        why = {"alpha": "its alpha band is 0 everywhere", "mask": "its mask excludes every pixel",
               "nodata": "every pixel is NaN or Inf"}.get(getattr(geometry, "mask_source", ""), "")
        if nodata is not None:
            why = f"every pixel equals nodata={nodata:g}" if store.mask_name == MASK else \
                f"every pixel of the bands the model takes equals nodata={nodata:g}"
        raise InvalidInputError(input_path, f"has no valid pixel ({why or 'all masked'}); nothing to segment")


def _mask_blocks(mask: Any) -> Any:
    """Chunk-sized slices of a mask, stopping early in practice at the first valid chunk."""
    import itertools

    ranges = [range(0, n, c) for n, c in zip(mask.shape, mask.chunks)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, s + c) for s, c in zip(start, mask.chunks))


def unlabelled_note(named: Path | str, store: ImageStore, stats: dict[str, Any], nodata: int,
                     client: Client) -> str | None:
    """Valid input pixels a raster's way back left without a label (a CRS change's footprint edge, where no valid
    model pixel reaches them): counted into ``stats["unlabelled"]`` and said, never a silent hole.  Nodata
    labels beyond the input's own invalid pixels are those; one pass over the input's mask counts the latter.
    Said here, as :func:`input_warnings` says its lines; the caller keeps it with them."""
    space = stats.get("model_space") or {}
    if space.get("kind") != "raster" or stats.get("output_grid", "input") != "input":
        return None
    nodata_labels = int(stats.get("label_pixels", {}).get(str(nodata), 0))
    if nodata_labels == 0:
        return None
    invalid = 0
    if store.mask is not None:
        invalid = int(store.mask.size) - int(client.compute(da.from_zarr(store.mask).sum()).result())
    unlabelled = nodata_labels - invalid
    stats["unlabelled"] = unlabelled
    if unlabelled <= 0:
        return None
    share = unlabelled / float(np.prod(store.mask.shape if store.mask is not None else store.image.shape[1:]))
    text = (f"{named}: {unlabelled:,} valid pixel(s) ({share:.3%}) have no label: no valid model pixel reaches "
            "them through the CRS change (valid pixels at an edge of the valid area, or alone); they are nodata")
    say(text, logging.WARNING)
    return text


def input_warnings(input_path: Path | str, store: ImageStore, model: LoadedModel, options: SegmentOptions,
                   *, announce: bool = True) -> list[str]:
    """Things worth saying about an input segflow still segments (logged unless ``announce`` is False, and kept
    in the statistics)."""
    out = []
    geometry = store.meta.geometry
    picture = str(getattr(store.meta.source, "format", "")).upper() in ("PNG", "JPEG", "MPO", "BMP")
    if geometry.kind == "raster" and not geometry.crs_wkt and not geometry.epsg and not picture:
        spacing, t = model.card.input.spacing, geometry.transform
        size = (abs(float(t[0])), abs(float(t[4])))
        if model.card.applies_raster_model_space and spacing and \
                any(v > 0 and abs(v - p) > 1e-6 * v for v, p in zip(spacing[::-1], size)):
            # the transform's units are an assumption: say so where it resamples (a pixel grid of 1 x 1 "metres")
            out.append(f"{input_path}: has no CRS, so its pixel size ({size[0]:g} x {size[1]:g}) is taken as metres "
                       f"and resampled to the {' x '.join(f'{v:g}' for v in spacing[::-1])} m of model "
                       f"{model.card.name!r}"
                       "; the output is written on the same pixel grid without a CRS (give the raster its CRS)")
        else:
            out.append(f"{input_path}: has no CRS; the output is written on the same pixel grid without a CRS")
    dicom = getattr(geometry, "dicom", None)
    if dicom is not None and dicom.depth_assumed:
        from storage.dicom import DEPTH_ASSUMED_NOTE

        out.append(f"{input_path}: {DEPTH_ASSUMED_NOTE}")
    if geometry.kind == "volume" and dicom is None and geometry.qform_code == 0 and geometry.sform_code == 0:
        # an Analyze-style header: nothing says where the patient's left is; the statistics' "RAS" boxes and the
        # pictures' L/R letters rest on nibabel's default, which had gone unsaid
        out.append(f"{input_path}: has neither a qform nor an sform code, so its orientation is unknown: read as "
                   "nibabel reads it (RAS, pixdim spacing); left and right in its pictures and bounding boxes are "
                   "a guess")
    if dicom is not None and dicom.copies:
        shown = ", ".join(dicom.copies[:3]) + (f" and {len(dicom.copies) - 3} more" if len(dicom.copies) > 3 else "")
        out.append(f"{input_path}: {len(dicom.copies)} file(s) are byte-identical copies of other files of the "
                   f"series (same SOPInstanceUID), read once: {shown}")
    shape = tuple(int(n) for n in store.image.shape[1:])
    inf = model.card.inference
    if geometry.kind == "volume" and len(shape) == 3 and any(n == 1 < r for n, r in zip(shape, inf.roi)):
        padded = "with zeros" if inf.padding == "constant" and inf.padding_value == 0.0 else \
            f"with {inf.padding_value:g}" if inf.padding == "constant" else f"({inf.padding})"
        out.append(f"{input_path}: is one slice thick ({' x '.join(map(str, shape[::-1]))} voxels), and model "
                   f"{model.card.name!r} is 3D (windows of {' x '.join(map(str, inf.roi))}): it sees "
                   f"the slice padded {padded}, which it was hardly trained on")
    for note in (modelspace.unnamed_bands_note(store, model, options), modelspace.dtype_note(store, model)):
        if note is not None:
            out.append(f"{input_path}: {note}")
    for text in out if announce else ():
        say(text, logging.WARNING)
    return out


__all__ = ["check_has_data", "input_warnings", "unlabelled_note"]
