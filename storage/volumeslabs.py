"""A NIfTI volume read a bounded slab of k slices at a time, or only the planes wanted.

A quicklook of a scan must not hold the scan: a 512x512x1000 label map is
250 MiB as uint8, an image twice that, and bigger scans exist.  Everything a
quicklook reads goes through here, in slabs of at most :data:`SLAB_BYTES`
(whole i-j planes: a ``.nii.gz`` cannot seek, so cropping in i or j would
save no decompression), or as single planes.  Label values are checked slab
by slab, so a float or negative label map is refused with the file's name
whichever pass reads it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from storage.errors import CorruptInputError, IncompatibleInputError, InputError, InvalidInputError
from storage.geometry import voxel_axes_problem
from storage.niftiopen import NIFTI_READ_ERRORS, error_text, quietly

__all__ = ["LabelVolume", "SLAB_BYTES", "gather_planes", "image_planes", "load_nifti", "take_plane"]

SLAB_BYTES = 8 << 20  # what one slab read at a time may take (its copies and masks come on top)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) per voxel axis


def load_nifti(path: Path) -> Any:
    """The NIfTI image object (data not read), refused with the file's name when it is not a usable volume."""
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a directory, not a NIfTI file")
    try:
        with quietly():
            img = nib.load(path, mmap=False, keep_file_open=True)
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(path, f"cannot read it as NIfTI: {error_text(exc)}") from None
    if not isinstance(img, nib.Nifti1Pair):  # also Nifti1Image, Nifti2Image
        raise InvalidInputError(path, f"is {type(img).__name__}, not NIfTI")
    affine = np.asarray(img.affine, dtype=np.float64)
    problem = voxel_axes_problem(affine[:3, :3], img.header.get_xyzt_units()[0])
    if problem is not None:
        raise InvalidInputError(path, problem)
    return img


class LabelVolume:
    """A label NIfTI whose voxels are read on demand, as uint8 (uint16 for wider files), in bounded k slabs.

    Each read checks that the values are whole numbers in 0..65535, so a bad
    file fails on the first slab that shows it, not after a full read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.img = load_nifti(path)
        shape = tuple(int(n) for n in self.img.shape)
        if len(shape) < 2 or (len(shape) > 3 and any(n != 1 for n in shape[3:])):
            raise InvalidInputError(path, f"has shape {shape}; a label volume is 3-D")
        self._file_shape = shape
        self.shape: tuple[int, int, int] = (shape[0], shape[1], shape[2] if len(shape) > 2 else 1)
        disk = np.dtype(self.img.get_data_dtype())
        scaled = (float(self.img.dataobj.slope), float(self.img.dataobj.inter)) != (1.0, 0.0)
        if disk.kind not in "biuf" or disk.fields is not None:
            raise InvalidInputError(path, f"labels have data type {disk}; expected integers")
        narrow = disk.itemsize == 1 and disk.kind in "biu" and not scaled
        self.dtype = np.dtype(np.uint8 if narrow else np.uint16)
        self._read_itemsize = max(disk.itemsize, 4 if scaled else 1)  # bytes a voxel takes while read
        self.gzipped = str(path).lower().endswith(".gz")

    def slab_depth(self, bytes_per_voxel: int = 1) -> int:
        """k slices in one slab when each voxel costs ``bytes_per_voxel`` besides the read itself."""
        ni, nj, _ = self.shape
        return max(1, SLAB_BYTES // max(1, ni * nj * (self._read_itemsize + bytes_per_voxel)))

    def read(self, k0: int, k1: int) -> np.ndarray:
        """Slices k0..k1-1 as (I, J, k1-k0) labels, checked."""
        ni, nj, _ = self.shape
        try:
            if len(self._file_shape) == 2:
                slab = np.asanyarray(self.img.dataobj).reshape(ni, nj, 1)
            else:
                tail = (0,) * (len(self._file_shape) - 3)
                slab = np.asanyarray(self.img.dataobj[(slice(None), slice(None), slice(k0, k1), *tail)])
        except NIFTI_READ_ERRORS as exc:
            raise CorruptInputError(self.path, f"cannot read voxel data (slices {k0}-{k1 - 1}): "
                                               f"{error_text(exc)}") from None
        return _checked(slab, self.path, int(np.iinfo(self.dtype).max)).astype(self.dtype, copy=False)

    def slabs(self, k0: int, k1: int, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first k, slab) for slabs of ``depth`` slices from k0, in file order."""
        for ks in range(k0, k1, depth):
            yield ks, self.read(ks, min(ks + depth, k1))

    def boxes(self, boxes: Sequence[Box]) -> Iterator[tuple[int, np.ndarray, int]]:
        """(box index, voxels of the box in this slab, their first k) for several boxes in one forward pass."""
        if not boxes:
            return
        depth = self.slab_depth(2)
        k0, k1 = min(b[2][0] for b in boxes), max(b[2][1] for b in boxes)
        for ks in range(k0, k1, depth):
            ke = min(ks + depth, k1)
            inside = [n for n, b in enumerate(boxes) if b[2][0] < ke and ks < b[2][1]]
            if not inside:
                continue
            slab = self.read(ks, ke)
            for n in inside:
                (i0, i1), (j0, j1), (b0, b1) = boxes[n]
                lo, hi = max(b0, ks), min(b1, ke)
                yield n, slab[i0:i1, j0:j1, lo - ks:hi - ks], lo

    def planes(self, wanted: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """The planes (voxel axis, index) asked for: sliced directly from an uncompressed 3-D file, else one pass."""
        if self.gzipped or len(self._file_shape) < 3:
            return gather_planes(self.read, self.shape, wanted, self.dtype, self.slab_depth(0))
        tail = (0,) * (len(self._file_shape) - 3)
        try:
            raw = {r: take_plane(self.img.dataobj, r, tail) for r in sorted(set(wanted))}
        except NIFTI_READ_ERRORS as exc:
            raise CorruptInputError(self.path, f"cannot read voxel data: {error_text(exc)}") from None
        top = int(np.iinfo(self.dtype).max)
        return {r: _checked(p, self.path, top).astype(self.dtype, copy=False) for r, p in raw.items()}


def _checked(slab: np.ndarray, path: Path, top: int) -> np.ndarray:
    """A slab of label values, refused when they are not whole numbers in 0..``top``."""
    if slab.dtype.kind == "b" or slab.dtype in (np.dtype(np.uint8), np.dtype(np.uint16)) or not slab.size:
        return slab
    if slab.dtype.kind == "f" and (not np.all(np.isfinite(slab)) or np.any(slab != np.rint(slab))):
        raise InvalidInputError(path, "label values are not whole numbers")
    low, high = slab.min(), slab.max()
    if low < 0:
        raise InvalidInputError(path, f"has negative label values (down to {low})")
    if high > top:
        raise InvalidInputError(path, f"has label values up to {high}; a quicklook draws values up to {top}")
    return slab


def take_plane(volume: Any, request: tuple[int, int], tail: tuple[int, ...] = ()) -> np.ndarray:
    """The plane ``index`` of voxel axis ``axis`` (``tail`` picks the first volume of a 4-D proxy)."""
    axis, index = request
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = index
    return np.asarray(volume[(*sl, *tail)])


def gather_planes(read: Callable[[int, int], np.ndarray], shape: Sequence[int], wanted: Sequence[tuple[int, int]],
                  dtype: Any, depth: int) -> dict[tuple[int, int], np.ndarray]:
    """Planes (voxel axis, index) copied out of one forward pass of ``depth``-slice slabs from ``read(k0, k1)``.

    Slabs holding no wanted plane are skipped when only axial (k) planes are
    wanted; an i or j plane needs every slab.
    """
    ni, nj, nk = (int(n) for n in shape[:3])
    wanted = sorted(set(wanted))
    out = {r: np.empty([n for a, n in enumerate((ni, nj, nk)) if a != r[0]], dtype=dtype) for r in wanted}
    for k0 in range(0, nk, depth):
        k1 = min(k0 + depth, nk)
        if not any(a != 2 or k0 <= i < k1 for a, i in wanted):
            continue
        slab = read(k0, k1)
        for a, i in wanted:
            if a == 0:
                out[(a, i)][:, k0:k1] = slab[i]
            elif a == 1:
                out[(a, i)][:, k0:k1] = slab[:, i]
            elif k0 <= i < k1:
                out[(a, i)][:] = slab[:, :, i - k0]
    return out


def store_planes(image: Any, lab_img: Any, requests: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """The planes shown of an ingested volume's first channel (a ``(C, k, j, i)`` zarr array: the NIfTI's voxel
    axes reversed), for an input that is no one file (a DICOM series): only those planes are read."""
    shape = tuple(int(n) for n in reversed(image.shape[1:]))
    if shape != tuple(int(n) for n in lab_img.shape[:3]):
        raise IncompatibleInputError(None, f"image shape {shape} differs from the labels' {tuple(lab_img.shape[:3])}")
    out = {}
    for axis, index in sorted(set(requests)):
        where: list[Any] = [0, slice(None), slice(None), slice(None)]
        where[3 - axis] = index
        out[(axis, index)] = np.asarray(image[tuple(where)]).T.astype(np.float32)
    return out


def image_planes(path: Path, lab_img: Any, requests: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Only the planes shown of the image on the labels' grid, as float32.

    An uncompressed file is sliced directly (nibabel reads just those
    bytes); a gzipped one cannot seek back cheaply, so its planes are
    gathered in one forward pass of bounded slabs.
    """
    img = load_nifti(path)
    shape = tuple(int(n) for n in img.shape)
    if shape[:3] != tuple(int(n) for n in lab_img.shape[:3]):
        raise IncompatibleInputError(path, f"image shape {shape[:3]} differs from the labels' {tuple(lab_img.shape[:3])}")
    if not np.allclose(img.affine, lab_img.affine, atol=1e-3):
        raise IncompatibleInputError(path, "image and labels have different affines (not on the same voxel grid)")
    tail = (0,) * (len(shape) - 3)  # the first volume of a 4-D image
    dataobj = img.dataobj
    wanted = sorted(set(requests), key=lambda r: (r[0] != 2, r))
    try:
        if not str(path).lower().endswith(".gz"):
            return {r: take_plane(dataobj, r, tail).astype(np.float32) for r in wanted}

        def read(k0: int, k1: int) -> np.ndarray:
            return np.asanyarray(dataobj[(slice(None), slice(None), slice(k0, k1), *tail)])

        depth = max(1, SLAB_BYTES // max(1, shape[0] * shape[1] * np.dtype(dataobj.dtype).itemsize))
        return gather_planes(read, shape, wanted, np.float32, depth)
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(path, f"cannot read voxel data: {error_text(exc)}") from None
