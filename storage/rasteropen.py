"""Opening a GeoTIFF/VRT through GDAL, with every way it can fail said in one line naming the file.

Ingest, probe, a mosaic's tile plan and a STAC item's assets all open rasters
and read their image bands and pixel type; they share these readers so that a
file one of them refuses, every other refuses in the same words.  GDAL's own
messages are dug out of rasterio's exception chains here too.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.windows import Window

from storage.errors import CorruptInputError, InputError, InvalidInputError, UnsupportedFormatError
from storage.inputfiles import PICTURE_SUFFIXES

try:  # GDAL errors that escape rasterio's own wrapping (e.g. CPLE_AppDefinedError)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - private module moved
    CPLE_BaseError = RasterioError  # type: ignore[misc,assignment]

__all__ = ["ALLOWED_DRIVERS", "GDAL_CACHE_MB", "GDAL_ERRORS", "alpha_bands", "gdal_env", "describe_window",
           "grid_windows", "gdal_message", "image_bands", "image_dtype", "open_raster", "quiet_libtiff", "read_bands",
           "s3_endpoint_options", "without_crs_ok"]

ALLOWED_DRIVERS = ("GTiff", "VRT")
"""GDAL drivers ingest accepts: other formats GDAL happens to open (PNG, XYZ text...) are refused."""
PICTURE_DRIVERS = ("PNG", "JPEG", "BMP")  # pictures are read by storage.photo; one named like a GeoTIFF is told so

GDAL_ERRORS = (RasterioError, CPLE_BaseError)
"""What rasterio and GDAL raise for a file they cannot read: caught to turn into a one-line error."""

GDAL_CACHE_MB = 64
"""GDAL block cache while streaming: each block is read or written once, so a small cache loses nothing."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def gdal_message(exc: BaseException, path: Path | str | None = None) -> str:
    """The most specific message in an exception chain: rasterio often says only 'see previous'.  GDAL names
    the file again ("'/data/x.tif' not recognized as ..."): with ``path``, that repeat of what the line begins
    with is left out."""
    msgs = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msgs.append(str(e))
        e = e.__cause__ or e.__context__
    specific = [m for m in msgs if m and "previous exception" not in m]
    text = (specific[-1] if specific else msgs[0]) or type(exc).__name__
    if path is not None:
        for named in (f"'{path}' ", f"{path}: "):
            text = text.replace(named, "")
    return text


@contextmanager
def without_crs_ok() -> Iterator[None]:
    """Open or write rasters without rasterio's ``NotGeoreferencedWarning``: segflow says in its own words that
    an input has no CRS and that its outputs go on the same pixel grid without one (the run's warnings), so
    rasterio's two lines of library text in front of that (or of a one-line error) are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def describe_window(win: Window) -> str:
    """A window as 'rows a-b, cols c-d', so a pixel-read error says where the file is damaged."""
    r, c = int(win.row_off), int(win.col_off)
    return f"rows {r}-{r + int(win.height) - 1}, cols {c}-{c + int(win.width) - 1}"


_LIBTIFF_QUIETED = False


def quiet_libtiff() -> None:
    """libtiff's own default handlers off: they print straight to the process's stderr, past GDAL's error
    handling and Python's logging ("_tiffWriteProc: No space left on device." three times above segflow's one
    line on a full disk; "TIFFReadDirectory: Warning, ..." for odd tags).  GDAL reports the same failures as its
    own errors, which segflow turns into its messages.  Linux only (the library mapped into this process, found
    in /proc/self/maps); elsewhere nothing changes."""
    global _LIBTIFF_QUIETED
    if _LIBTIFF_QUIETED:
        return
    _LIBTIFF_QUIETED = True
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "libtiff" in line}
    except OSError:
        return
    for path in sorted(p for p in paths if p.startswith("/") and ".so" in p):
        try:
            lib = ctypes.CDLL(path)  # the copy already loaded: dlopen hands back its handle
            for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                setter = getattr(lib, name)
                setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                setter(None)
        except (OSError, AttributeError):
            continue


def gdal_env() -> rasterio.Env:
    """GDAL's environment for reading inputs: a capped block cache, and the S3 endpoint fsspec uses.

    Each block is read or written once, so caching gains nothing, and GDAL's
    default cap (5% of RAM) lets resident memory grow with the raster's size.
    A STAC item's ``s3://`` assets are read by GDAL (``/vsis3/``) while the
    item itself comes through fsspec: :func:`s3_endpoint_options` lets one
    environment point both at the same server.
    """
    quiet_libtiff()
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, **s3_endpoint_options())


def s3_endpoint_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL's options for the S3-compatible server (MinIO, Ceph) that ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` names, which fsspec and boto read and GDAL 3.10 does not; nothing when GDAL's own
    ``AWS_S3_ENDPOINT`` is set (the user's choice wins) or neither is."""
    env = os.environ if environ is None else environ
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if env.get("AWS_S3_ENDPOINT") or not url:
        return {}
    parsed = urlparse(url)
    if not parsed.netloc:
        return {}
    return {"AWS_S3_ENDPOINT": parsed.netloc + parsed.path.rstrip("/"),
            "AWS_HTTPS": "NO" if parsed.scheme == "http" else "YES",
            "AWS_VIRTUAL_HOSTING": env.get("AWS_VIRTUAL_HOSTING", "FALSE")}


def open_raster(path: Path) -> DatasetReader:
    """Open with rasterio, turning every way a file can be unusable into a typed one-line error."""
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise UnsupportedFormatError(path, "is a directory, not a GeoTIFF or VRT file")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    if not head:
        raise CorruptInputError(path, "file is empty (0 bytes)")
    try:
        with without_crs_ok():
            src = rasterio.open(path)
    except GDAL_ERRORS as exc:
        looks_known = head.startswith(_TIFF_MAGIC) or head.lstrip().startswith(b"<VRTDataset")
        cls = CorruptInputError if looks_known else UnsupportedFormatError
        what = "damaged GeoTIFF/VRT" if looks_known else "not a GeoTIFF or VRT"
        raise cls(path, f"{what}, rasterio cannot open it: {gdal_message(exc, path)}") from None
    if src.driver not in ALLOWED_DRIVERS:  # pictures are read by storage.photo, as training decodes them
        driver = src.driver
        src.close()
        if driver in PICTURE_DRIVERS and not path.name.lower().endswith(PICTURE_SUFFIXES):
            raise UnsupportedFormatError(path, f"is a {driver} picture but is named like a GeoTIFF; rename it "
                                               f".{ {'PNG': 'png', 'BMP': 'bmp'}.get(driver, 'jpg')}")
        raise UnsupportedFormatError(path, f"is a {driver} raster; segflow reads GeoTIFF and VRT (and PNG, JPEG or "
                                           "BMP pictures)")
    problem = transform_problem(src.transform)
    if problem is not None:
        src.close()
        raise InvalidInputError(path, problem)
    return src


def transform_problem(transform: Affine) -> str | None:
    """Why a geotransform maps no pixel to a place (NaN, infinity, a pixel size of 0); None when it is usable.
    Such a file ran to the end: NaN in its STAC item (invalid JSON) and numpy's warnings on the terminal."""
    terms = [float(v) for v in tuple(transform)[:6]]
    shown = ", ".join(f"{v:g}" for v in terms)
    if not all(math.isfinite(v) for v in terms):
        return f"has a non-finite geotransform ({shown}): no pixel-to-map mapping"
    det = transform.determinant
    if not math.isfinite(det) or det == 0:
        return f"has a singular geotransform ({shown}): a pixel size of 0"
    return None


def alpha_bands(src: DatasetReader) -> list[int]:
    """1-based indexes of the bands whose colour interpretation is alpha: a mask, never an image channel."""
    return [i for i, ci in zip(src.indexes, src.colorinterp) if ci == ColorInterp.alpha]


def image_bands(src: DatasetReader, path: Path) -> list[int]:
    """1-based indexes of the bands that are image channels: alpha only feeds the mask."""
    alphas = alpha_bands(src)
    bands = [i for i in src.indexes if i not in alphas]
    if src.width == 0 or src.height == 0 or not bands:
        raise InvalidInputError(path, f"raster has no pixels ({src.count} bands, {src.width}x{src.height})")
    return bands


def read_bands(src: DatasetReader, bands: list[int], dtype: Any = None, **kwargs: Any) -> np.ndarray:
    """``src.read(bands, ...)`` as ``dtype`` (default: the bands' common type), also for a VRT whose bands have
    different types, which rasterio refuses to read in one call ("more than one 'dtype' found")."""
    types = {np.dtype(src.dtypes[b - 1]) for b in bands}
    dtype = np.result_type(*types) if dtype is None else np.dtype(dtype)
    if len(types) <= 1:
        return src.read(bands, out_dtype=dtype, **kwargs)
    planes = [src.read([b], out_dtype=dtype, **{**kwargs, **({"out_shape": (1, *kwargs["out_shape"][-2:])}
                                                              if "out_shape" in kwargs else {})})
              for b in bands]
    return (np.ma.concatenate if kwargs.get("masked") else np.concatenate)(planes, axis=0)


def image_dtype(src: DatasetReader, bands: list[int], path: Path) -> np.dtype:
    """The one dtype the image bands are read as: mixed-dtype VRTs are promoted, complex pixels refused."""
    dtypes = {np.dtype(src.dtypes[i - 1]) for i in bands}
    if any(dt.kind == "c" for dt in dtypes):
        raise InvalidInputError(path, f"complex pixels ({', '.join(sorted(map(str, dtypes)))}) cannot be segmented")
    return np.result_type(*dtypes)  # mixed-dtype VRTs are promoted, not refused


def grid_windows(height: int, width: int, step_y: int, step_x: int) -> Iterator[Window]:
    """Row-major tiling of the grid; edge windows are clipped to the raster."""
    for y in range(0, height, step_y):
        for x in range(0, width, step_x):
            yield Window(x, y, min(step_x, width - x), min(step_y, height - y))
