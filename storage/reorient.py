"""A label volume stored in another axis order, read on the grid of the one it is compared with.

The same voxels can be stored in several orders: segflow writes a DICOM
series in its own order (rows, columns, slices as stored: L, P, S), dcm2niix
flips the rows (L, A, S), and a viewer may save a mask as R, A, S.  Their
affines differ, yet every voxel lies at the same place.  When one grid is an
exact permutation and flip of the other (same voxel sizes and positions, to
:data:`VOXEL_TOL` of a voxel), :func:`on_grid_of` gives the second as a view
in the first's index order, block by block: nothing is resampled and nothing
is read whole.  Anything else is a different grid and stays refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from storage.labelmaps import LabelSource

VOXEL_TOL = 1e-3  # how far (in voxels) the two grids' voxel centres may differ and still be one grid


def axis_map(affine: Any, shape: tuple[int, ...], other_affine: Any, other_shape: tuple[int, ...]
             ) -> tuple[tuple[int, ...], tuple[bool, ...]] | None:
    """For each axis of the grid (``affine``, ``shape``): the axis of the other grid it runs along and whether
    backwards; None unless the other grid holds exactly the same voxel centres."""
    if len(shape) != 3 or len(other_shape) != 3:
        return None
    m = np.linalg.inv(np.asarray(other_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    rot, shift = m[:3, :3], m[:3, 3]
    signs = np.round(rot)
    if np.abs(rot - signs).max() > VOXEL_TOL or not np.array_equal(np.abs(signs).sum(axis=0), np.ones(3)) or \
            not np.array_equal(np.abs(signs).sum(axis=1), np.ones(3)):
        return None
    perm = tuple(int(np.argmax(np.abs(signs[:, a]))) for a in range(3))  # other axis of each axis
    flips = tuple(bool(signs[perm[a], a] < 0) for a in range(3))
    for a in range(3):
        b = perm[a]
        if shape[a] != other_shape[b]:
            return None
        start = other_shape[b] - 1 if flips[a] else 0  # where voxel 0 of axis a lands on axis b
        if abs(shift[b] - start) > VOXEL_TOL:
            return None
    return perm, flips


class _Reoriented:
    """The other grid's array read in this grid's (i, j, k) order."""

    def __init__(self, base: Any, perm: tuple[int, ...], flips: tuple[bool, ...]) -> None:
        self.base, self.perm, self.flips = base, perm, flips
        other = tuple(int(n) for n in base.shape)
        self.shape = tuple(other[b] for b in perm)

    def __getitem__(self, region: tuple[slice, ...]) -> Any:
        other = [slice(None)] * 3
        for a, sl in enumerate(region):
            start, stop, _ = sl.indices(self.shape[a])
            n = self.shape[a]
            other[self.perm[a]] = slice(n - stop, n - start) if self.flips[a] else slice(start, stop)
        data = np.asarray(self.base[tuple(other)])
        data = np.transpose(data, self.perm)  # axis a of the result is the other grid's axis perm[a]
        return data[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]


def on_grid_of(source: "LabelSource", reference: "LabelSource") -> "LabelSource":
    """``source`` read on ``reference``'s grid when it is the same grid in another axis order; else as it is
    (the grid check then says how they differ)."""
    if source.kind != "volume" or reference.kind != "volume" or source.affine is None or reference.affine is None:
        return source
    if np.allclose(np.asarray(source.affine, float), np.asarray(reference.affine, float)):
        return source
    found = axis_map(reference.affine, reference.shape, source.affine, source.shape)
    if found is None:
        return source
    perm, flips = found
    spacing = tuple(source.spacing[b] for b in perm)
    return replace(source, array=_Reoriented(source.array, perm, flips), spacing=spacing,
                   affine=np.asarray(reference.affine, float))


__all__ = ["VOXEL_TOL", "axis_map", "on_grid_of"]
