"""Cloud-Optimized GeoTIFFs out, block by block, whole or not at all.

A label or probability map is written window by window into a tiled GeoTIFF
beside the target, copied once into COG layout (a COG's layout only survives
a final copy) and renamed into place, so peak memory depends on the block
size, never on the raster size, and a reader never sees half a file.  A copy
that ran out of space is caught after the fact: libtiff says so on stderr while
GDAL returns success, so the finished file's tiles are checked to lie inside
it (:func:`check_whole`) before the rename.
"""

from __future__ import annotations

import errno
import glob
import logging
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import DatasetWriter
from rasterio.transform import Affine

from storage.classes import LabelClass, label_dtype, nodata_value
from storage.errors import ExportError
from storage.geometry import RasterGeometry
from storage.rasteropen import GDAL_ERRORS, gdal_env, gdal_message, grid_windows, without_crs_ok

__all__ = ["COMPRESS_THREADS", "check_whole", "write_cog", "write_label_cog", "write_probability_cog"]


def _read_step(arr: Any, block: int, axis: int) -> int:
    """Read whole source chunks when they are larger than a block, so no chunk is decoded twice."""
    chunks = getattr(arr, "chunks", None)
    size = chunks[axis] if chunks and isinstance(chunks[axis], int) else block
    return block * max(1, math.ceil(size / block))


def _check_grid(name: str, shape: tuple[int, ...], geometry: RasterGeometry) -> None:
    if tuple(shape[-2:]) != (geometry.height, geometry.width):
        raise ValueError(f"{name} shape {tuple(shape)} does not match the grid "
                         f"{geometry.height}x{geometry.width}")


COMPRESS_THREADS = "ALL_CPUS"  # GDAL's NUM_THREADS for writing GeoTIFF and COG tiles


def write_cog(out_path: str | PathLike[str], profile: dict[str, Any], fill: Callable[[DatasetWriter], None],
               cog_options: dict[str, str]) -> Path:
    """Tiled GTiff intermediate -> one COG copy -> os.replace: a COG's layout only survives a final copy.

    All temporaries share one hidden prefix in the target directory (so the
    rename is atomic and GDAL side files are caught) and are removed on
    success and on failure.
    """
    out = Path(out_path).absolute()
    parent = out.parent
    if not parent.exists():
        raise ExportError(out, f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise ExportError(out, f"{parent} is not a directory")
    prefix = f".{out.name}.{uuid.uuid4().hex[:12]}"
    tiled, final = parent / f"{prefix}.tiled.tif", parent / f"{prefix}.cog.tif"
    # GDAL compresses tiles (and the COG's overviews) on every core: the same bytes, an 8192² label COG in 0.35
    # instead of 0.57 s on 2 cores
    threads = {"num_threads": COMPRESS_THREADS}
    try:
        with gdal_env(), without_crs_ok():  # an input without CRS gives an output without one (said already)
            with rasterio.open(tiled, "w", **profile, **threads) as dst:
                fill(dst)
            rasterio.shutil.copy(tiled, final, driver="COG", **cog_options, **threads)
        missing = check_whole(final)
        if missing is not None:  # GDAL returned success over failed writes
            raise ExportError(out, f"cannot write COG: {_space_problem(parent, _needed_bytes(profile)) or missing}")
        os.replace(final, out)
    except (*GDAL_ERRORS, OSError) as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else gdal_message(exc)
        # GDAL reports a full disk as whatever broke next ("not recognized as being in a supported file
        # format", "TIFFAppendToStrip:Write error at scanline 0"); a plain write says what is wrong, so try one
        # before passing GDAL's words on, while GDAL's temporaries still fill the disk (removed first, they made
        # room, the probe fitted and libtiff's words were all the user got)
        space = _space_problem(parent, _needed_bytes(profile))
        for p in parent.glob(glob.escape(prefix) + "*"):
            p.unlink(missing_ok=True)
        msg = space or _creation_problem(msg, parent)
        raise ExportError(out, f"cannot write COG: {msg}") from None
    finally:
        for p in parent.glob(glob.escape(prefix) + "*"):
            p.unlink(missing_ok=True)
    return out


def check_whole(path: Path) -> str | None:
    """None when every tile of every level (each IFD) of a TIFF lies inside the file, else what is missing.

    On a full disk libtiff prints ``_tiffWriteProc: No space left on device`` and GDAL's COG copy returns
    success: the file kept its directory and lost its tiles, was renamed into place, hashed into the provenance
    and called ``ok``, and ``verify`` passed it.  Reading the directories only (tifffile) costs milliseconds.
    """
    import tifffile

    # what tifffile logs of a cut file ("invalid offset to first page") reached stderr above segflow's own line,
    # which says it; segflow reads TIFFs with tifffile for this check only
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        size = path.stat().st_size
        total = missing = 0
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    total += 1
                    missing += bool(count) and offset + count > size
    except Exception as exc:  # noqa: BLE001 - tifffile raises several types for a cut directory
        return f"the file written is not a whole TIFF ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if not total:
        return f"the file written is incomplete: its directory lists no tiles ({size} bytes)"
    if missing:
        return f"the file written is incomplete: {missing} of {total} tiles lie past its end ({size} bytes)"
    return None


def _file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE in bytes (``ulimit -f``), None when unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_WRITE_FAILED = re.compile(r"write error|_tiffWriteProc|TIFFAppendTo|TIFFWrite", re.IGNORECASE)
_CREATE_FAILED = re.compile(r"^Attempt to create new tiff file '.*' failed: .*: ([^:]+)$")


def _creation_problem(msg: str, parent: Path) -> str:
    """GDAL names the hidden temporary it could not create; the user needs the directory and the reason.  A
    failed libtiff write whose cause is gone by the time it is probed (other writers of a batch freed the disk
    they had filled) is said as the write failure it is, not as libtiff's "TIFFAppendToStrip:Write error"."""
    found = _CREATE_FAILED.match(msg)
    if found:
        return f"cannot create files in {parent}: {found.group(1).strip()}"
    if _WRITE_FAILED.search(msg):
        try:
            free = f"{shutil.disk_usage(parent).free} bytes are free there now"
        except OSError:
            free = "its free space is unknown"
        return f"a write in {parent} failed (libtiff: {msg}); was the disk full while it was written? {free}"
    return msg


def _needed_bytes(profile: dict[str, Any]) -> int:
    """What the uncompressed pixels of a written raster take: an upper bound of a COG's size, less overviews."""
    return int(profile["width"]) * int(profile["height"]) * int(profile["count"]) * np.dtype(profile["dtype"]).itemsize


def _space_problem(directory: Path, needed: int) -> str | None:
    """'no space left on device' (or quota, or file size limit) when a plain write in ``directory`` fails so.

    Probes with up to 1 MiB (or what the output needs, when less); when that
    fits, says how little is free if the device holds less than the output's
    uncompressed size. None when nothing points at space.
    """
    limit = _file_size_limit()
    if limit is not None and needed > limit:
        # a probe under the limit fits, and GDAL had blamed what it read back ("Failed to read directory")
        return f"file size limit exceeded (ulimit -f: {limit} bytes; the output may need up to {needed})"
    probe = directory / f".segflow-space-probe.{uuid.uuid4().hex[:12]}"
    size = max(4096, min(needed, 1 << 20))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            block = memoryview(b"\0" * size)
            while block:  # a write may stop short at a limit; the next one then says why
                block = block[os.write(fd, block):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in _SPACE_ERRNOS:
            what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                    errno.EFBIG: "file size limit exceeded"}[exc.errno]
            return f"{what} ({exc.strerror})"
        return None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if free < needed:
        return f"only {free} bytes free on the device, up to {needed} needed (disk full?)"
    return None


def _base_profile(geometry: RasterGeometry, count: int, dtype: str, nodata: float | None, block: int) -> dict:
    if block < 16 or block % 16:
        raise ValueError(f"block must be a positive multiple of 16, got {block}")
    return dict(driver="GTiff", width=geometry.width, height=geometry.height, count=count, dtype=dtype,
                crs=geometry.rasterio_crs(), transform=Affine(*geometry.transform), nodata=nodata, tiled=True,
                blockxsize=block, blockysize=block, compress="DEFLATE", zlevel=1, bigtiff="IF_SAFER")


def _provenance_tags(provenance: dict | None) -> dict[str, str]:
    return {} if provenance is None else {"SEGFLOW_PROVENANCE": json.dumps(provenance, sort_keys=True, default=str)}


def write_label_cog(
    labels: Any,
    geometry: RasterGeometry,
    out_path: str | PathLike[str],
    *,
    classes: list[LabelClass],
    mask: Any = None,
    provenance: dict | None = None,
    block: int = 512,
    overview_resampling: str = "NEAREST",
) -> Path:
    """Write a (y, x) label map as a COG on exactly the input grid, with colour table and class names.

    ``labels`` (zarr/numpy) is read window by window.  Where ``mask`` is False
    the nodata value is written (labels usually hold it already).  Overviews
    use ``NEAREST`` (or ``MODE``): averaging class values would invent classes.
    """
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D (y, x), got shape {tuple(labels.shape)}")
    _check_grid("labels", tuple(labels.shape), geometry)
    if mask is not None:
        _check_grid("mask", tuple(mask.shape), geometry)
    dtype, nodata = label_dtype(classes), nodata_value(classes)
    top = np.iinfo(dtype).max

    def fill(dst: DatasetWriter) -> None:
        step_y, step_x = _read_step(labels, block, 0), _read_step(labels, block, 1)
        for win in grid_windows(geometry.height, geometry.width, step_y, step_x):
            ys, xs = win.toslices()
            arr = np.asarray(labels[ys, xs])
            if arr.dtype != np.dtype(dtype) and arr.size and (arr.min() < 0 or arr.max() > top):
                raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit {dtype}")
            arr = arr.astype(dtype, copy=False)
            if mask is not None:
                arr = np.where(np.asarray(mask[ys, xs], dtype=bool), arr, np.array(nodata, dtype))
            dst.write(arr, 1, window=win)
        colors = {c.value: (*c.color, 255) for c in classes}
        dst.write_colormap(1, {nodata: (0, 0, 0, 0), **colors})
        dst.set_band_description(1, "labels")
        table = [c.model_dump(mode="json", exclude_none=True) for c in sorted(classes, key=lambda c: c.value)]
        dst.update_tags(CLASSES=json.dumps(table), **_provenance_tags(provenance))

    profile = _base_profile(geometry, 1, dtype, nodata, block)
    options = dict(COMPRESS="DEFLATE", BLOCKSIZE=str(block), OVERVIEW_RESAMPLING=overview_resampling.upper(),
                   BIGTIFF="IF_SAFER")
    return write_cog(out_path, profile, fill, options)


def write_probability_cog(
    probs: Any,
    geometry: RasterGeometry,
    out_path: str | PathLike[str],
    *,
    class_names: list[str] | None = None,
    mask: Any = None,
    dtype: Literal["float32", "uint8"] = "float32",
    provenance: dict | None = None,
    block: int = 512,
) -> Path:
    """Write (C, y, x) class probabilities as a C-band COG on the input grid.

    ``float32`` keeps values as they are (nodata NaN); ``uint8`` stores
    round(p·254) with a GDAL scale of 1/254 and nodata 255, four times smaller.
    """
    if len(probs.shape) != 3:
        raise ValueError(f"probs must be 3-D (C, y, x), got shape {tuple(probs.shape)}")
    _check_grid("probs", tuple(probs.shape), geometry)
    if mask is not None:
        _check_grid("mask", tuple(mask.shape), geometry)
    count = int(probs.shape[0])
    names = list(class_names) if class_names is not None else [f"class{i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} class names for {count} probability bands")
    nodata: float = math.nan if dtype == "float32" else 255

    def fill(dst: DatasetWriter) -> None:
        step_y, step_x = _read_step(probs, block, 1), _read_step(probs, block, 2)
        for win in grid_windows(geometry.height, geometry.width, step_y, step_x):
            ys, xs = win.toslices()
            arr = np.asarray(probs[:, ys, xs], dtype=np.float32)
            if dtype == "uint8":
                arr = np.rint(np.clip(arr, 0.0, 1.0) * 254.0)
            if mask is not None:
                arr = np.where(np.asarray(mask[ys, xs], dtype=bool), arr, np.float32(nodata))
            dst.write(arr.astype(dtype), window=win)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
        if dtype == "uint8":
            dst.scales = (1 / 254,) * count
        dst.update_tags(**_provenance_tags(provenance))

    profile = _base_profile(geometry, count, dtype, nodata, block)
    options = dict(COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=str(block), OVERVIEW_RESAMPLING="AVERAGE",
                   BIGTIFF="IF_SAFER")
    return write_cog(out_path, profile, fill, options)
