"""The bad-input corpus: each case writes one input (or model) into a temporary folder.

Every case is generated here from a few hundred bytes of numpy, rasterio and
nibabel, so the corpus needs nothing downloaded; ``tests/test_bad_inputs.py``
runs them through ``segflow segment`` and the ``segment-batch`` flow and
``docs/errors.md`` lists each by its id with the message segflow gives.

A case either fails with a one-line error naming its file and containing
``expect``, or (``ok=True``) must succeed: an awkward path, NaN/Inf pixels
(masked as nodata), a raster without a CRS (segmented, with a warning).

The DICOM cases (:data:`DICOM_CASES`) are drawn with pydicom and highdicom by
``tests/dicom_samples.py``.  How a case is given decides how segflow names it
(``given``): a ``series`` folder expands into one series, named in its error by
``SeriesRef.display`` (``FOLDER [series UID]``); a ``folder`` without an image
series and a ``file`` given alone are named by their path.  Loose DICOM files
named together are grouped into series, so each ``file`` case runs in a batch
of its own.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import rasterio
import torch
from rasterio.control import GroundControlPoint
from rasterio.transform import from_origin

from storage.samples import make_phantom, make_scene
from tests.models import tiny_model

SCENE_SIZE = (96, 96)  # 2D inputs: 4 bands (the 2D model's channels)
VOLUME_SHAPE = (24, 20, 16)  # 3D inputs: one channel


@dataclass(frozen=True)
class Case:
    """One corpus entry; ``model`` is the model the batch uses: '2d' (4 channels) or '3d' (1 channel)."""

    id: str
    what: str
    model: str
    make: Callable[[Path], Path]
    expect: str = ""  # a part of the one-line error; empty for cases that succeed
    ok: bool = False
    given: str = "path"  # "path"; DICOM: "series" (a folder of one series), "folder" (no series), "file" (alone)


# --------------------------------------------------------------------------- small writers


def _raster(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633", nodata: float | None = 0,
            transform: object = None, **extra: object) -> Path:
    count, h, w = data.shape
    with rasterio.open(path, "w", driver=extra.pop("driver", "GTiff"), width=w, height=h, count=count,
                       dtype=str(data.dtype), crs=crs, nodata=nodata,
                       transform=transform if transform is not None else from_origin(500000, 6000000, 10, 10),
                       **extra) as dst:
        dst.write(data)
    return path


def _scene_pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(200, 4000, (4, *SCENE_SIZE), dtype=np.uint16)


def _good_scene(folder: Path, name: str = "scene.tif") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path, truth = make_scene(folder / name, size=SCENE_SIZE, seed=7)
    truth.unlink()  # only the image is an input; the truth would be segmented too if left in a glob
    return path


def _volume(path: Path, data: np.ndarray, affine: np.ndarray | None = None, *, header: object = None) -> Path:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
    return path


def _volume_pixels(seed: int = 0, dtype: str = "int16") -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, VOLUME_SHAPE).astype(dtype)


def _nifti_header_bytes(shape: tuple[int, ...]) -> bytes:
    """A valid single-file NIfTI-1 header (352 bytes with the extension flag) declaring ``shape`` int16."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


# --------------------------------------------------------------------------- 2D cases


def spaces_and_non_ascii(folder: Path) -> Path:
    return _good_scene(folder, "in put é ü 北.tif")


def nan_inf_pixels(folder: Path) -> Path:
    data = _scene_pixels(1).astype(np.float32)
    data[:, 10:20, 10:20] = np.nan
    data[2, 40:44, 50:60] = np.inf
    data[0, 70, 70] = -np.inf
    return _raster(folder / "nan_inf.tif", data, nodata=None)


def no_crs(folder: Path) -> Path:
    return _raster(folder / "no_crs.tif", _scene_pixels(2), crs=None)


def truncated_tif(folder: Path) -> Path:
    good = _good_scene(folder, "_full.tif")
    target = folder / "truncated.tif"
    target.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    good.unlink()
    return target


def vrt_missing_source(folder: Path) -> Path:
    """A VRT whose GeoTIFF was moved away: GDAL opens it and fails at the first pixel read, after the run began."""
    import rasterio.shutil

    source = _good_scene(folder, "_vrt_source.tif")
    target = folder / "missing_source.vrt"
    rasterio.shutil.copy(source, target, driver="VRT")
    source.unlink()
    return target


def _raw_band_vrt(path: Path, source: str) -> Path:
    """A 4-band 32 x 32 VRT whose raw bands read ``source``'s bytes as pixels (``VRTRawRasterBand``)."""
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}" subClass="VRTRawRasterBand"><SourceFilename '
                    f'relativeToVRT="0">{source}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1'
                    "</PixelOffset><LineOffset>32</LineOffset></VRTRasterBand>" for b in range(1, 5))
    path.write_text('<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>EPSG:32633</SRS><GeoTransform>500000,10,'
                    f"0,5000000,0,-10</GeoTransform>{bands}</VRTDataset>")
    return path


def vrt_raw_band_elsewhere(folder: Path) -> Path:
    """A VRT reading /etc/passwd's bytes as pixels: it had been segmented, and drawn in a quicklook."""
    return _raw_band_vrt(folder / "raw_passwd.vrt", "/etc/passwd")


def vrt_stdin(folder: Path) -> Path:
    """A VRT reading /vsistdin/: a run on a terminal (or under a pipe left open) hung on it."""
    return _raw_band_vrt(folder / "stdin.vrt", "/vsistdin/")


def _tiff_tag(blob: bytes, tag: int) -> list[int]:
    """Values of one tag of a little-endian classic TIFF's first directory (SHORT or LONG)."""
    ifd = struct.unpack_from("<I", blob, 4)[0]
    for i in range(struct.unpack_from("<H", blob, ifd)[0]):
        entry = ifd + 2 + 12 * i
        code, typ, count = struct.unpack_from("<HHI", blob, entry)
        if code == tag:
            fmt, size = ("<H", 2) if typ == 3 else ("<I", 4)
            where = entry + 8 if count * size <= 4 else struct.unpack_from("<I", blob, entry + 8)[0]
            return [struct.unpack_from(fmt, blob, where + k * size)[0] for k in range(count)]
    raise KeyError(tag)


def corrupt_tif(folder: Path) -> Path:
    """Valid header and directory, garbage where the first compressed tile is."""
    path = _raster(folder / "corrupt.tif", _scene_pixels(3), tiled=True, blockxsize=32, blockysize=32,
                   compress="deflate")
    blob = bytearray(path.read_bytes())
    start, size = _tiff_tag(blob, 324)[0], _tiff_tag(blob, 325)[0]  # TileOffsets, TileByteCounts
    blob[start:start + size] = bytes((i * 37 + 11) % 256 for i in range(size))
    path.write_bytes(bytes(blob))
    return path


def bitflip_deflate_tif(folder: Path) -> Path:
    """Two bytes flipped near the end of a deflate tile: GDAL decodes 19 wrong pixels without an error (libtiff
    never reaches the zlib checksum), and the scene had been segmented and reported done."""
    pixels = _scene_pixels(4)
    path = _raster(folder / "bitflip.tif", pixels, tiled=True, blockxsize=32, blockysize=32, compress="deflate")
    blob = bytearray(path.read_bytes())
    start, size = _tiff_tag(blob, 324)[5], _tiff_tag(blob, 325)[5]
    at = start + size - 40
    blob[at:at + 2] = bytes(b ^ 0xFF for b in blob[at:at + 2])
    path.write_bytes(bytes(blob))
    with rasterio.open(path) as ds:  # the case this is: GDAL reads it without a word, and the pixels are wrong
        assert (ds.read() != pixels).any()
    return path


def empty_tif(folder: Path) -> Path:
    path = folder / "empty.tif"
    path.write_bytes(b"")
    return path


def text_named_tif(folder: Path) -> Path:
    path = folder / "notes.tif"
    path.write_text("this is a text file, not a raster\n")
    return path


def nifti_named_tif(folder: Path) -> Path:
    path = folder / "volume_named.tif"
    _volume(folder / "_v.nii", _volume_pixels())
    os.replace(folder / "_v.nii", path)
    return path


def png_named_tif(folder: Path) -> Path:
    return _raster(folder / "png_inside.tif", np.full((4, 32, 32), 7, np.uint8), driver="PNG", crs=None,
                   nodata=None)


def unsupported_suffix(folder: Path) -> Path:
    good = _good_scene(folder, "_s.tif")
    target = folder / "scene.gif"
    os.replace(good, target)
    return target


def tiff_named_jpg(folder: Path) -> Path:
    good = _good_scene(folder, "_j.tif")
    target = folder / "scene_j.jpg"
    os.replace(good, target)
    return target


def all_nodata(folder: Path) -> Path:
    return _raster(folder / "all_nodata.tif", np.zeros((4, *SCENE_SIZE), np.uint16), nodata=0)


def all_nan(folder: Path) -> Path:
    return _raster(folder / "all_nan.tif", np.full((4, *SCENE_SIZE), np.nan, np.float32), nodata=None)


def three_bands(folder: Path) -> Path:
    return _raster(folder / "three_bands.tif", _scene_pixels(4)[:3])


def complex_tif(folder: Path) -> Path:
    data = (_scene_pixels(5).astype(np.float32) + 1j).astype(np.complex64)
    return _raster(folder / "complex.tif", data, nodata=None)


def gcps_only(folder: Path) -> Path:
    path = folder / "gcps_only.tif"
    gcps = [GroundControlPoint(row=r, col=c, x=500000 + 10 * c, y=6000000 - 10 * r)
            for r, c in ((0, 0), (0, 95), (95, 0), (95, 95))]
    with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=4, dtype="uint16", nodata=0,
                       gcps=gcps, crs="EPSG:32633") as dst:
        dst.write(_scene_pixels(6))
    return path


def huge_dims_tif(folder: Path) -> Path:
    """An 8x8 striped TIFF whose header then claims 60000 x 60000 pixels (the file stays 1 KB)."""
    path = _raster(folder / "huge_dims.tif", np.ones((4, 8, 8), np.uint16), interleave="pixel")
    blob = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", blob, 4)[0]
    for i in range(struct.unpack_from("<H", blob, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", blob, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<H" if typ == 3 else "<I", blob, entry + 8, 60000)
    path.write_bytes(bytes(blob))
    return path


def sparse_tif(folder: Path) -> Path:
    """A tiled GeoTIFF of 60000 x 60000 x 4 whose tiles GDAL left out (SPARSE_OK): 100 KB that read as zeros."""
    path = folder / "sparse.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60000, height=60000, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), tiled=True,
                       blockxsize=512, blockysize=512, sparse_ok=True):
        pass
    return path


def nan_geotransform(folder: Path) -> Path:
    """Ran to the end: NaN in its STAC item (invalid JSON) and numpy's warnings on the terminal."""
    from rasterio.transform import Affine

    return _raster(folder / "nan_gt.tif", _scene_pixels(), transform=Affine(float("nan"), 0, 500000, 0, -10, 6e6))


def zero_pixel_size(folder: Path) -> Path:
    from rasterio.transform import Affine

    return _raster(folder / "zero_gt.tif", _scene_pixels(), transform=Affine(0, 0, 500000, 0, 0, 6e6))


def directory(folder: Path) -> Path:
    path = folder / "a_folder.tif"
    path.mkdir()
    (path / "inside.txt").write_text("x")
    return path


def fifo(folder: Path) -> Path:
    """Stands in for an unreadable file: as root, chmod 000 does not deny reading; a FIFO would block a reader."""
    path = folder / "pipe.tif"
    os.mkfifo(path)
    return path


def analyze_fifo_image(folder: Path) -> Path:
    """An Analyze/NIfTI pair whose image file is a FIFO: only the header given was checked, and the run hung."""
    import nibabel as nib

    path = folder / "pair.hdr"
    nib.save(nib.Nifti1Pair(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    (folder / "pair.img").unlink()
    os.mkfifo(folder / "pair.img")
    return path


def analyze_linked_image(folder: Path) -> Path:
    """A pair whose image file links elsewhere (to /etc/passwd, it drew that file's bytes into a quicklook)."""
    path = folder / "pair.hdr"
    nib.save(nib.Nifti1Pair(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    elsewhere = folder.parent / f"{folder.name}-elsewhere.img"
    (folder / "pair.img").rename(elsewhere)
    (folder / "pair.img").symlink_to(elsewhere)
    return path


def sparse_nii(folder: Path) -> Path:
    """A NIfTI-1 header declaring 32000 x 32000 x 256 int16 (488 GiB) over a sparse file: its size matched the
    header, so it passed the truncation check and ingest ran on, reading zeros."""
    path = folder / "sparse.nii"
    header = bytearray(_nifti_header_bytes((32000, 32000, 256)))
    with open(path, "wb") as f:
        f.write(bytes(header))
        f.truncate(len(header) + 32000 * 32000 * 256 * 2)
    return path


def dangling_symlink(folder: Path) -> Path:
    path = folder / "gone.tif"
    path.symlink_to(folder / "deleted-target.tif")
    return path


def symlink_loop(folder: Path) -> Path:
    path, other = folder / "loop-a.tif", folder / "loop-b.tif"
    path.symlink_to(other.name)
    other.symlink_to(path.name)
    return path


def missing(folder: Path) -> Path:
    return folder / "never_written.tif"


def volume_to_2d_model(folder: Path) -> Path:
    return _volume(folder / "volume_for_2d.nii.gz", _volume_pixels())


# --------------------------------------------------------------------------- 3D cases


def good_phantom(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path, truth = make_phantom(folder / "phantom.nii.gz", shape=VOLUME_SHAPE, seed=3)
    truth.unlink()
    return path


def truncated_nii(folder: Path) -> Path:
    good = _volume(folder / "_t.nii", _volume_pixels(1))
    target = folder / "truncated.nii"
    target.write_bytes(good.read_bytes()[:2000])
    good.unlink()
    return target


def truncated_nii_gz(folder: Path) -> Path:
    good = _volume(folder / "_t.nii.gz", _volume_pixels(2))
    target = folder / "truncated_gz.nii.gz"  # truncated.nii.gz's outputs would clash with truncated.nii's
    target.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    return target


def damaged_nii_gz(folder: Path) -> Path:
    """A gzip NIfTI with 400 bytes flipped inside its voxel data (stored, not deflated, so it still decodes):
    only the stream's CRC tells.  It was segmented from the wrong values, 'ok'."""
    import gzip

    good = _volume(folder / "_d.nii", _volume_pixels(3))
    stream = bytearray(gzip.compress(good.read_bytes(), compresslevel=0))
    middle = len(stream) // 2
    for i in range(middle, middle + 400):
        stream[i] ^= 0x7F
    target = folder / "damaged_gz.nii.gz"
    target.write_bytes(bytes(stream))
    good.unlink()
    return target


def empty_nii_gz(folder: Path) -> Path:
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def unreadable_dcm(folder: Path) -> Path:
    path = folder / "noise.dcm"
    path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(500)))
    return path


def garbage_header_nii(folder: Path) -> Path:
    path = folder / "garbage_header.nii"
    path.write_bytes(bytes((i * 53 + 7) % 256 for i in range(1000)))
    return path


def tif_named_nii(folder: Path) -> Path:
    good = _good_scene(folder, "_g.tif")
    target = folder / "raster_named.nii"
    os.replace(good, target)
    return target


def nan_nifti(folder: Path) -> Path:
    data = _volume_pixels(3, "float32")
    data[2:4, 3:5, 1] = np.nan
    data[10, 10, 10] = np.inf
    return _volume(folder / "nan_voxels.nii.gz", data)


def rgb24_nifti(folder: Path) -> Path:
    data = np.zeros(VOLUME_SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _volume(folder / "rgb24.nii.gz", data)


def complex_nifti(folder: Path) -> Path:
    return _volume(folder / "complex.nii.gz", _volume_pixels(4, "float32").astype(np.complex64))


def zero_size_dim(folder: Path) -> Path:
    return _volume(folder / "zero_dim.nii.gz", np.zeros((24, 0, 16), np.int16))


def _zero_pixdim(path: Path, *, sform: bool) -> Path:
    """A volume whose pixdim[1] is 0 as written (nibabel would refuse to set it, and sets it to 1 on reading)."""
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    img = nib.Nifti1Image(_volume_pixels(6), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine if sform else None, code=2 if sform else 0)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]: the header's byte 76 holds pixdim[0]
    path.write_bytes(bytes(raw))
    return path


def zero_voxel_size(folder: Path) -> Path:
    """pixdim[1] = 0 where the affine comes from pixdim (a qform, no sform): its spacing is unknown."""
    return _zero_pixdim(folder / "zero_voxel_size.nii", sform=False)


def zero_pixdim_with_sform(folder: Path) -> Path:
    """pixdim[1] = 0 beside an sform, which gives the spacing: segmented, without nibabel's note on stderr."""
    return _zero_pixdim(folder / "zero_pixdim_sform.nii", sform=True)


def huge_voxel_size(folder: Path) -> Path:
    """pixdim[3] = 1e30 in a qform-only header: it was segmented, with a liver of 3e30 mL in its statistics."""
    affine = np.diag([0.9, 0.9, 1e30, 1.0])
    img = nib.Nifti1Image(_volume_pixels(7), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(None, code=0)
    path = folder / "huge_voxel_size.nii.gz"
    nib.save(img, str(path))
    return path


def singular_affine(folder: Path) -> Path:
    """The sform's j column is zero (the header is written as is: nibabel would refuse to build it)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:, 1] = 0.0
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(VOLUME_SHAPE)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(None, code=0)
    path = folder / "singular_affine.nii.gz"
    nib.save(nib.Nifti1Image(_volume_pixels(5), None, hdr), str(path))
    return path


def huge_dims_nii(folder: Path) -> Path:
    path = folder / "huge_dims.nii"
    path.write_bytes(_nifti_header_bytes((30000, 30000, 30000)) + b"\0" * 64)
    return path


def huge_dims_nii_gz(folder: Path) -> Path:
    path = folder / "huge_dims.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(_nifti_header_bytes((30000, 30000, 30000)) + b"\0" * 64)
    return path


def nonfinite_scaling(folder: Path) -> Path:
    path = _volume(folder / "inf_intercept.nii", _volume_pixels(6))
    blob = bytearray(path.read_bytes())
    struct.pack_into("<ff", blob, 112, 2.0, float("inf"))  # scl_slope, scl_inter
    path.write_bytes(bytes(blob))
    return path


def one_dimensional(folder: Path) -> Path:
    return _volume(folder / "one_dim.nii.gz", np.arange(50, dtype=np.int16))


def raster_to_3d_model(folder: Path) -> Path:
    return _raster(folder / "raster_for_3d.tif", _scene_pixels(8)[:1])


def two_channel_volume(folder: Path) -> Path:
    data = np.stack([_volume_pixels(7), _volume_pixels(8)], axis=-1)
    return _volume(folder / "two_channels.nii.gz", data)


# --------------------------------------------------------------------------- model cases (the batch's model is bad)


def unknown_architecture(folder: Path) -> Path:
    model = tiny_model(folder / "unknown_arch", spatial_dims=2, channels=4, roi=[32, 32])
    card = json.loads((model.path / "card.json").read_text())
    card["architecture"]["name"] = "resnet9000"
    (model.path / "card.json").write_text(json.dumps(card))
    return model.path


def weights_do_not_match_card(folder: Path) -> Path:
    model = tiny_model(folder / "swapped_weights", spatial_dims=2, channels=4, roi=[32, 32])
    other = tiny_model(folder / "_other", spatial_dims=2, channels=4, roi=[32, 32], seed=9)
    shutil.copyfile(other.path / "weights.safetensors", model.path / "weights.safetensors")
    shutil.rmtree(other.path)
    return model.path


class _Payload:
    """Unpickling this would create ``marker``: code chosen by whoever wrote the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


PAYLOAD_MARKER = "payload-ran"


def pickle_payload(folder: Path) -> Path:
    """A model directory whose weights are a pickle carrying code; its card even names the file's sha256."""
    from storage.hashing import sha256_file

    model = tiny_model(folder / "pickled", spatial_dims=2, channels=4, roi=[32, 32])
    weights = model.path / "weights.safetensors"
    torch.save({"state_dict": model.module.state_dict(), "x": _Payload(folder / PAYLOAD_MARKER)}, weights)
    card = json.loads((model.path / "card.json").read_text())
    card["weights_sha256"] = sha256_file(weights)
    (model.path / "card.json").write_text(json.dumps(card))
    return model.path


def invalid_card(folder: Path) -> Path:
    model = tiny_model(folder / "bad_card", spatial_dims=2, channels=4, roi=[32, 32])
    card = json.loads((model.path / "card.json").read_text())
    card["inference"]["overlap"] = 1.5
    (model.path / "card.json").write_text(json.dumps(card))
    return model.path


def wrong_tensors(folder: Path) -> Path:
    """Weights of a wider network, with the card's hash updated to them: hash fine, tensors don't fit."""
    from storage.hashing import sha256_file

    model = tiny_model(folder / "wrong_tensors", spatial_dims=2, channels=4, roi=[32, 32])
    wide = tiny_model(folder / "_wide", spatial_dims=2, channels=3, roi=[32, 32])
    shutil.copyfile(wide.path / "weights.safetensors", model.path / "weights.safetensors")
    shutil.rmtree(wide.path)
    card = json.loads((model.path / "card.json").read_text())
    card["weights_sha256"] = sha256_file(model.path / "weights.safetensors")
    (model.path / "card.json").write_text(json.dumps(card))
    return model.path


def nan_weights(folder: Path) -> Path:
    """A diverged run's weights: one NaN in a BatchNorm's running mean, the card's hash updated to them."""
    from safetensors.torch import load_file, save_file

    from storage.hashing import sha256_file

    model = tiny_model(folder / "nan_weights", spatial_dims=2, channels=4, roi=[32, 32])
    weights = model.path / "weights.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in sorted(state.items()) if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    card = json.loads((model.path / "card.json").read_text())
    card["weights_sha256"] = sha256_file(weights)
    (model.path / "card.json").write_text(json.dumps(card))
    return model.path


# --------------------------------------------------------------------------- the corpus

INPUT_CASES: list[Case] = [
    # inputs that must succeed
    Case("spaces-non-ascii", "a path with spaces and non-ASCII characters", "2d", spaces_and_non_ascii, ok=True),
    Case("nan-inf-pixels", "float raster with NaN, +Inf and -Inf pixels, no nodata value", "2d", nan_inf_pixels,
         ok=True),
    Case("no-crs", "GeoTIFF with a geotransform but no CRS", "2d", no_crs, ok=True),
    # 2D model
    Case("truncated-tif", "GeoTIFF cut to a third of its bytes", "2d", truncated_tif, "damaged GeoTIFF/VRT"),
    Case("corrupt-tif", "valid header, garbage in the compressed tiles", "2d", corrupt_tif,
         "its deflate-compressed block at rows 0-31, cols 0-31 is damaged"),
    Case("bitflip-deflate-tif", "four bytes flipped in a deflate tile, which GDAL decodes without an error", "2d",
         bitflip_deflate_tif, "its deflate-compressed block at rows 32-63, cols 64-95 is damaged"),
    Case("vrt-missing-source", "a VRT whose source GeoTIFF is gone", "2d", vrt_missing_source,
         "its source file _vrt_source.tif is missing"),
    Case("vrt-raw-band-elsewhere", "a VRT whose raw bands read /etc/passwd", "2d", vrt_raw_band_elsewhere,
         "its source '/etc/passwd' is a raw band's file outside the VRT's own folder"),
    Case("vrt-stdin", "a VRT whose source is /vsistdin/", "2d", vrt_stdin,
         "its source '/vsistdin/' uses GDAL's /vsistdin/ handler, which reads no file segflow may open"),
    Case("empty-tif", "0-byte .tif", "2d", empty_tif, "file is empty (0 bytes)"),
    Case("text-named-tif", "a text file named .tif", "2d", text_named_tif,
         "not a GeoTIFF or VRT, rasterio cannot open it: not recognized as being in a supported file format"),
    Case("nifti-named-tif", "a NIfTI volume named .tif (wrong extension)", "2d", nifti_named_tif,
         "is a NIfTI volume but is named like a GeoTIFF"),
    Case("png-named-tif", "a PNG named .tif", "2d", png_named_tif,
         "is a PNG picture but is named like a GeoTIFF; rename it .png"),
    Case("unsupported-suffix", "a GeoTIFF named .gif", "2d", unsupported_suffix, "unsupported file type"),
    Case("tiff-named-jpg", "a GeoTIFF named .jpg", "2d", tiff_named_jpg,
         "is a TIFF image but is named like a picture (.png, .jpg, .bmp); rename it .tif"),
    Case("all-nodata", "every pixel equals the nodata value", "2d", all_nodata,
         "has no valid pixel (every pixel equals nodata=0)"),
    Case("all-nan", "float raster, every pixel NaN", "2d", all_nan, "has no valid pixel (every pixel is NaN or Inf)"),
    Case("band-count", "3 bands given to a 4-channel model", "2d", three_bands, "takes 4 channels, the input has 3"),
    Case("complex-tif", "complex64 GeoTIFF (unsupported dtype)", "2d", complex_tif, "complex pixels"),
    Case("gcps-only", "GeoTIFF georeferenced by GCPs only", "2d", gcps_only, "has only GCPs"),
    Case("huge-dims-tif", "8x8 striped TIFF whose header claims 60000x60000", "2d", huge_dims_tif,
         "samples a byte where no compression of a real image gives more than about 1,000: a sparse or forged file"),
    Case("sparse-tif", "60000x60000x4 tiled GeoTIFF with every tile left out (SPARSE_OK)", "2d", sparse_tif,
         "(14,400,000,000 samples) in"),
    Case("nan-geotransform", "GeoTIFF whose geotransform holds NaN", "2d", nan_geotransform,
         "has a non-finite geotransform"),
    Case("zero-pixel-size", "GeoTIFF whose geotransform has a pixel size of 0", "2d", zero_pixel_size,
         "has a singular geotransform"),
    Case("directory", "a folder holding no DICOM files where a file is expected", "2d", directory,
         "is a folder holding no DICOM files"),
    Case("fifo", "a FIFO (unreadable as a file; stands in for chmod 000, which root ignores)", "2d", fifo,
         "is a FIFO (named pipe), not a regular file"),
    Case("dangling-symlink", "a symbolic link to a deleted file", "2d", dangling_symlink,
         "is a broken symbolic link"),
    Case("symlink-loop", "two symbolic links naming each other", "2d", symlink_loop,
         "is a symbolic link in a loop (to loop-b.tif)"),
    Case("missing", "a path that does not exist", "2d", missing, "no such file"),
    Case("3d-to-2d-model", "a NIfTI volume given to a 2D model", "2d", volume_to_2d_model, "is 2D, the input is 3D"),
    # 3D model
    Case("unreadable-dcm", "noise named .dcm", "3d", unreadable_dcm, "is not a readable DICOM file"),
    Case("analyze-fifo-img", "an Analyze/NIfTI pair whose .img is a FIFO", "3d", analyze_fifo_image,
         "its image file pair.img is a FIFO (named pipe), not a regular file"),
    Case("analyze-linked-img", "an Analyze/NIfTI pair whose .img links to a file in another folder", "3d",
         analyze_linked_image, "its image file pair.img links to a file outside the header's folder"),
    Case("sparse-nii", "NIfTI declaring 32000 x 32000 x 256 over a sparse file of that size", "3d", sparse_nii,
         "a sparse or forged file, refused"),
    Case("truncated-nii", "uncompressed NIfTI cut after 2000 bytes", "3d", truncated_nii, "data is truncated"),
    Case("truncated-nii-gz", "gzip NIfTI cut in half", "3d", truncated_nii_gz, "cannot read voxel data"),
    Case("damaged-nii-gz", "gzip NIfTI with bytes flipped in its voxel data (the CRC fails)", "3d", damaged_nii_gz,
         "gzip stream is damaged"),
    Case("empty-nii-gz", "0-byte .nii.gz", "3d", empty_nii_gz, "file is empty (0 bytes)"),
    Case("garbage-header-nii", "1000 bytes of noise named .nii", "3d", garbage_header_nii,
         "cannot read the NIfTI header"),
    Case("tif-named-nii", "a GeoTIFF named .nii (wrong extension)", "3d", tif_named_nii,
         "is a TIFF image but is named like a NIfTI volume"),
    Case("nan-voxels", "float32 NIfTI with NaN and Inf voxels", "3d", nan_nifti, "NaN/Inf voxels"),
    Case("rgb24-nifti", "NIfTI RGB24 (unsupported dtype)", "3d", rgb24_nifti, "complex, RGB or long double"),
    Case("complex-nifti", "NIfTI complex64 (unsupported dtype)", "3d", complex_nifti, "complex, RGB or long double"),
    Case("zero-size-dim", "NIfTI of shape (24, 0, 16)", "3d", zero_size_dim, "zero-size dimension"),
    Case("singular-affine", "NIfTI whose affine has a zero column", "3d", singular_affine, "singular"),
    Case("zero-voxel-size", "NIfTI with pixdim[1] = 0 and a qform, no sform", "3d", zero_voxel_size,
         "has a voxel size of 0 (pixdim 0, 0.9, 3) and no sform, so its spacing is unknown"),
    Case("huge-voxel-size", "NIfTI whose qform gives voxels of 0.9 x 0.9 x 1e30 mm", "3d", huge_voxel_size,
         "has a voxel size of 0.9 x 0.9 x 1e+30 mm, over 10000 mm: no scan's, so its header is broken"),
    Case("zero-pixdim-sform", "NIfTI with pixdim[1] = 0 beside an sform (which gives the spacing)", "3d",
         zero_pixdim_with_sform, ok=True),
    Case("huge-dims-nii", "NIfTI header declaring 30000^3 voxels on a 416-byte file", "3d", huge_dims_nii,
         "data is truncated"),
    Case("huge-dims-nii-gz", "gzip NIfTI header declaring 30000^3 voxels in about 100 compressed bytes", "3d",
         huge_dims_nii_gz, "cannot hold more than"),
    Case("inf-scaling", "NIfTI with scl_slope 2 and scl_inter +Inf", "3d", nonfinite_scaling,
         "invalid intercept inf"),
    Case("one-dimensional", "NIfTI with a single axis", "3d", one_dimensional, "dimension(s); need at least 2"),
    Case("2d-to-3d-model", "a GeoTIFF given to a 3D model", "3d", raster_to_3d_model, "is 3D, the input is 2D"),
    Case("channel-count", "2-channel 4-D NIfTI given to a 1-channel model", "3d", two_channel_volume,
         "takes 1 channel, the input has 2 (its 4th axis, read as channels; a time series goes in one volume "
         "at a time)"),
]

MODEL_CASES: list[Case] = [
    Case("unknown-architecture", "model card naming an architecture not in the registry", "2d",
         unknown_architecture, "unknown architecture 'resnet9000'"),
    Case("weights-mismatch", "weights.safetensors swapped for another model's", "2d", weights_do_not_match_card,
         "does not match the card's"),
    Case("pickle-payload", "weights file is a pickle carrying code (card hash updated to match)", "2d",
         pickle_payload, "not a safetensors file"),
    Case("invalid-card", "card with overlap 1.5", "2d", invalid_card, "invalid model card: inference.overlap"),
    Case("wrong-tensors", "weights of another network shape (card hash updated to match)", "2d", wrong_tensors,
         "shape"),
    Case("nan-weights", "weights with a NaN (card hash updated to match); every pixel was labelled class 0, 'ok'",
         "2d", nan_weights, "weights hold 1 NaN value(s) in 1 tensor(s)"),
]

# --------------------------------------------------------------------------- DICOM cases (3D model)

DICOM_SHAPE = (6, 24, 24)  # slices, rows, columns of the good series


def good_series(folder: Path) -> Path:
    """A clean 6-slice CT series folder: the DICOM batches' good input."""
    from tests.dicom_samples import write_ct_series

    data = np.random.default_rng(11).normal(1024, 200, DICOM_SHAPE).astype(np.int16)
    write_ct_series(folder / "good_series", data, spacing=(2.5, 0.8, 0.7))
    return folder / "good_series"


def _bad_series(case: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        from tests.dicom_samples import write_bad_series

        write_bad_series(folder / "series", case)
        return folder / "series"

    make.__name__ = f"bad_series_{case}"
    return make


def dicom_no_image_series(folder: Path) -> Path:
    """DICOM files, none of them an image: a Philips-style DIRFILE and an SR report (and a text file)."""
    from tests.dicom_samples import write_basic_text_sr, write_dirfile

    target = folder / "no_images"
    target.mkdir()
    write_dirfile(target / "DIRFILE")
    write_basic_text_sr(target / "report.dcm")
    (target / "README.txt").write_text("not DICOM\n")
    return target


def dicom_sr_alone(folder: Path) -> Path:
    from tests.dicom_samples import write_basic_text_sr

    return write_basic_text_sr(folder / "report_sr.dcm")


def dicom_seg_alone(folder: Path) -> Path:
    """A real highdicom SEG given without the series it segments (the source slices are deleted)."""
    from tests.dicom_samples import write_ct_series, write_seg

    sources = write_ct_series(folder / "_src", np.zeros((3, 8, 8), np.int16))
    path = write_seg(folder / "labels_seg.dcm", sources)
    shutil.rmtree(folder / "_src")
    return path


DICOM_CASES: list[Case] = [
    Case("dicom-missing-slice", "CT series with its 4th of 6 slices removed", "3d", _bad_series("missing_slice"),
         "1 slice(s) missing: a 4 mm gap", given="series"),
    Case("dicom-varying-gaps", "slice gaps 2, 2, 2.6, 2, 2 mm", "3d", _bad_series("varying_gaps"),
         "slice gaps vary from 2 to 2.6 mm", given="series"),
    Case("dicom-mixed-orientation", "one slice rotated by 3 degrees", "3d", _bad_series("mixed_orientation"),
         "mixed slice orientations in one series", given="series"),
    Case("dicom-mixed-sizes", "one slice 6x5, the others 4x5", "3d", _bad_series("mixed_sizes"),
         "mixed image sizes in one series: 4x5, 6x5", given="series"),
    Case("dicom-mixed-spacing", "one slice with PixelSpacing 0.6 mm, the others 0.5 mm", "3d",
         _bad_series("mixed_spacing"), "mixed PixelSpacing in one series", given="series"),
    Case("dicom-gantry-tilt", "each slice 0.5 mm further in y (a 14 degree gantry tilt)", "3d",
         _bad_series("gantry_tilt"), "gantry tilt: slices step 0.500 mm sideways", given="series"),
    Case("dicom-no-pixel-data", "one slice without PixelData", "3d", _bad_series("no_pixel_data"),
         "IM0003.dcm has no pixel data", given="series"),
    Case("dicom-duplicate-position", "two slices at the same ImagePositionPatient", "3d",
         _bad_series("duplicate_position"), "two slices at the same position", given="series"),
    Case("dicom-undecodable", "JPEG XL Lossless transfer syntax (no installed decoder)", "3d",
         _bad_series("undecodable"), "cannot be decoded: no installed pixel decoder handles it", given="series"),
    Case("dicom-no-position", "one slice without ImagePositionPatient", "3d", _bad_series("no_position"),
         "IM0002.dcm has no ImagePositionPatient, which the series' other slices have", given="series"),
    Case("dicom-no-image-series", "a folder of DICOM files none of which is an image (DIRFILE, SR)", "3d",
         dicom_no_image_series, "no DICOM image series found", given="folder"),
    Case("dicom-sr-alone", "a Basic Text SR document given alone", "3d", dicom_sr_alone,
         "is a Basic Text SR Storage object, not an image", given="file"),
    Case("dicom-seg-alone", "a DICOM SEG given alone", "3d", dicom_seg_alone,
         "is a Segmentation object, not an image", given="file"),
]

# The real truncated DICOM files of ../shared/data/bad (header intact, pixel data cut short): given alone, each
# is a one-file series found at ingest, when its pixels are decoded.
SHARED_DICOM = {"CT_small.truncated.dcm": "CT_small.truncated.dcm: pixel data is truncated: 13700 of 32768 bytes",
                "MR_truncated.dcm": "MR_truncated.dcm: pixel data is truncated: 8130 of 8192 bytes"}

GOOD: dict[str, Callable[[Path], Path]] = {"2d": _good_scene, "3d": good_phantom, "dicom": good_series}


def all_ids() -> list[str]:
    return [c.id for c in INPUT_CASES + MODEL_CASES + DICOM_CASES]
