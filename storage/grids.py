"""Grid mathematics: the model's grid for a volume, exactly as MONAI computes it.

A *grid* is a shape plus an affine from voxel indices (i, j, k, 1) to world RAS
mm.  A model card asks for an orientation (``axcodes``) and a voxel spacing
(``pixdim``); MONAI's ``Orientationd`` followed by ``Spacingd`` (bilinear,
border padding, ``align_corners=False``, ``scale_extent=False``, float64) turns
the input grid into the model's grid.  ``model_grid`` reproduces that shape and
affine with numpy alone and factors the map between the two grids into what it
is when the voxel axes are orthogonal: per model axis, one source axis, an
exact flip (the orientation part, a view) and ``source = offset + scale *
model`` (the spacing part, an interpolation).  ``storage.resample`` applies it
chunk by chunk.  Arrays are in storage order (C, K, J, I), so storage axis ``s``
is MONAI's spatial axis ``2 - s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from storage.errors import InvalidInputError
from storage.geometry import SINGULAR_AFFINE, voxel_axes_problem

AFFINE_TOL = 1e-3  # MONAI's monai.data.utils.AFFINE_TOL: below it a grid counts as unchanged
_SNAP = 1e-9  # a scale this close to 1 (offset to 0) is exactly 1 (0): the axis is then copied, not interpolated
_SHEAR_TOL = 1e-3  # voxels of cross-axis displacement over the whole extent that we still treat as separable


@dataclass(frozen=True)
class AxisMap:
    """How one model axis (storage order) reads the input."""

    source_axis: int  # storage axis of the input it reads (0 = k, 1 = j, 2 = i)
    scale: float  # source_index = offset + scale * model_index, on the flipped source axis
    offset: float
    flip: bool  # orientation flip of the source axis (index n - 1 - x), exact
    size: int  # model-space length

    @property
    def is_copy(self) -> bool:
        """Same sampling as the (flipped) source axis: indexing, no interpolation."""
        return self.scale == 1.0 and self.offset == 0.0


@dataclass(frozen=True)
class GridMapping:
    """The input grid, the model grid and the separable map between them."""

    input_shape: tuple[int, int, int]  # (K, J, I)
    input_affine: np.ndarray
    model_shape: tuple[int, int, int]  # (K', J', I')
    model_affine: np.ndarray  # maps (i', j', k', 1) -> RAS mm, equal to MONAI's output affine
    axes: tuple[AxisMap, AxisMap, AxisMap]

    @property
    def is_identity(self) -> bool:
        """Same grid: the pipeline skips resampling entirely and outputs stay byte for byte the same."""
        return self.model_shape == self.input_shape and all(
            a.source_axis == s and not a.flip and a.is_copy for s, a in enumerate(self.axes)
        )

    @property
    def oriented_affine(self) -> np.ndarray:
        """The affine after the orientation step alone (MONAI's ``Spacing`` source affine)."""
        return self.input_affine @ _orientation_affine(self.axes, self.input_shape)

    @property
    def oriented_shape(self) -> tuple[int, int, int]:
        """Storage-order shape after the orientation step alone."""
        return tuple(self.input_shape[a.source_axis] for a in self.axes)  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        """Both grids and the mapping's parameters, for provenance."""
        return {
            "kind": "affine",
            "reference": "MONAI Orientationd + Spacingd (bilinear, border, align_corners=False)",
            "input": {"shape_kji": list(self.input_shape), "affine": _affine_json(self.input_affine)},
            "model": {"shape_kji": list(self.model_shape), "affine": _affine_json(self.model_affine)},
            "axes": [
                {"source_axis": a.source_axis, "scale": a.scale, "offset": a.offset, "flip": a.flip, "size": a.size}
                for a in self.axes
            ],
            "identity": self.is_identity,
        }


def _affine_json(affine: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(affine, dtype=np.float64)]


def affine_to_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing per (i, j, k) axis: column norms, as MONAI's ``affine_to_spacing``."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def _orientation_affine(axes: Sequence[AxisMap], shape_kji: Sequence[int]) -> np.ndarray:
    """Voxel map oriented (i', j', k') -> input (i, j, k): a permutation with flips."""
    xform = np.zeros((4, 4))
    xform[3, 3] = 1.0
    for s_out, a in enumerate(axes):
        out_ax, in_ax = 2 - s_out, 2 - a.source_axis
        if a.flip:
            xform[in_ax, out_ax] = -1.0
            xform[in_ax, 3] = shape_kji[a.source_axis] - 1
        else:
            xform[in_ax, out_ax] = 1.0
    return xform


def _orientation(affine: np.ndarray, axcodes: str | None) -> list[tuple[int, bool]]:
    """Per oriented MONAI axis: (input MONAI axis, flip), as MONAI's ``Orientation`` via nibabel."""
    if axcodes is None:
        return [(0, False), (1, False), (2, False)]
    try:
        dst = nib.orientations.axcodes2ornt(tuple(axcodes.upper()[:3]))
    except Exception as err:  # nibabel raises ValueError/KeyError for unknown codes
        raise InvalidInputError(None, f"axcodes {axcodes!r} are not a valid orientation ({err})") from None
    if len(axcodes) != 3 or np.isnan(dst).any():
        raise InvalidInputError(None, f"axcodes {axcodes!r} need one of L/R, P/A, I/S for each of the three axes")
    src = nib.io_orientation(affine)
    ornt = nib.orientations.ornt_transform(src, dst)  # row q: input axis q -> (oriented axis, flip)
    per_out: list[tuple[int, bool]] = [(0, False)] * 3
    for q, (out_ax, flip) in enumerate(ornt):
        per_out[int(out_ax)] = (q, bool(flip == -1))
    return per_out


def _zoom_affine(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """MONAI's ``zoom_affine(diagonal=False)``: keep rotation and axis signs, set the spacing."""
    scale = np.array(spacing, dtype=float, copy=True)
    scale[scale == 0] = 1.0
    rzs = affine[:-1, :-1]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    s = np.sign(np.diag(zs)) * np.abs(scale)
    new_affine = np.eye(4)
    new_affine[:-1, :-1] = rotation @ np.diag(s)
    return new_affine


def _shape_offset(shape_ijk: np.ndarray, in_affine: np.ndarray, out_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's ``compute_shape_offset(scale_extent=False)``: output shape and world origin."""
    shape = np.array(shape_ijk, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in shape], indexing="ij")).reshape((3, -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    try:
        corners_out = np.linalg.solve(out_affine, in_affine) @ corners
    except np.linalg.LinAlgError:
        raise InvalidInputError(None, "the model grid's affine is singular") from None
    corners = in_affine @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    offset = None
    for c in range(corners.shape[1]):
        min_corner = np.min(all_dist - all_dist[:, c : c + 1], 1)
        if np.allclose(min_corner, 0.0, rtol=AFFINE_TOL):
            offset = corners[:-1, c]
            break
    if offset is None:  # no corner is smallest on every axis (shear): centre-align, as MONAI
        offset = in_affine[:-1, :-1] @ (shape / 2.0) + in_affine[:-1, -1] - out_affine[:-1, :-1] @ (out_shape / 2.0)
    return out_shape.astype(int), offset


def _target_spacing(orig: np.ndarray, pixdim_ijk: Sequence[float] | float) -> np.ndarray:
    """MONAI ``Spacing``'s output spacing: pad/trim pixdim, keep an axis whose spacing is ≤ 0 or already within tolerance."""
    out = np.array(np.atleast_1d(np.asarray(pixdim_ijk, dtype=np.float64)), dtype=np.float64)[:3]
    if out.size == 0:
        raise InvalidInputError(None, "pixdim is empty")
    if out.size < 3:
        out = np.append(out, [out[-1]] * (3 - out.size))
    if not np.all(np.isfinite(out)):
        raise InvalidInputError(None, f"pixdim {list(map(float, out))} is not finite")
    for idx, (d, target) in enumerate(zip(orig, out)):
        if target - AFFINE_TOL <= d <= target + AFFINE_TOL:
            out[idx] = d
    return np.where(out > 0, out, orig)  # zoom_affine's fall_back_tuple: a non-positive value keeps the axis


def _check_affine(affine: np.ndarray, shape_kji: Sequence[int]) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InvalidInputError(None, "the volume's affine is not a finite 4x4 matrix")
    if voxel_axes_problem(a[:3, :3]) == SINGULAR_AFFINE:  # against the voxel's size: 50 nm voxels are not singular
        raise InvalidInputError(None, "the volume's affine is singular")
    if len(shape_kji) != 3 or any(int(n) < 1 for n in shape_kji):
        raise InvalidInputError(None, f"the volume's shape {tuple(shape_kji)} is not three positive lengths")
    return a


def model_grid(
    affine: np.ndarray,
    shape_kji: Sequence[int],
    *,
    axcodes: str | None,
    pixdim_ijk: Sequence[float] | float | None,
    name: str | None = None,
) -> GridMapping:
    """The grid MONAI's ``Orientationd(axcodes)`` then ``Spacingd(pixdim)`` give a volume, and the map to it.

    ``pixdim_ijk`` is in MONAI's order of the *oriented* axes (Spacingd runs
    after Orientationd).  ``None`` keeps orientation or spacing.  Raises
    ``InvalidInputError`` (naming ``name``, the volume) for a sheared affine,
    where the map is not separable, and for an unusable affine or card.
    """
    try:
        return _model_grid(affine, shape_kji, axcodes, pixdim_ijk)
    except InvalidInputError as err:
        if name is None or err.path is not None:
            raise
        raise InvalidInputError(name, err.problem) from None


def _model_grid(affine: np.ndarray, shape_kji: Sequence[int], axcodes: str | None,
                pixdim_ijk: Sequence[float] | float | None) -> GridMapping:
    a_in = _check_affine(affine, shape_kji)
    shape_kji = tuple(int(n) for n in shape_kji)
    shape_ijk = shape_kji[::-1]
    per_out = _orientation(a_in, axcodes)  # MONAI oriented axis -> (input MONAI axis, flip)

    # Orientation: exact permutation and flips; the affine as MONAI's MetaTensor gets it.
    orient_axes = [AxisMap(2 - per_out[2 - s][0], 1.0, 0.0, per_out[2 - s][1], shape_kji[2 - per_out[2 - s][0]])
                   for s in range(3)]
    a_o = a_in @ _orientation_affine(orient_axes, shape_kji)
    o_shape_ijk = np.array([shape_ijk[q] for q, _ in per_out])
    if pixdim_ijk is None:
        return GridMapping(shape_kji, a_in, tuple(int(n) for n in o_shape_ijk[::-1]), a_o, tuple(orient_axes))  # type: ignore[arg-type]

    # Spacing: MONAI's zoom_affine, compute_shape_offset and spatial_resample's "unchanged" test.
    out_d = _target_spacing(affine_to_spacing(a_o), pixdim_ijk)
    a_s = _zoom_affine(a_o, out_d)
    m_shape_ijk, offset = _shape_offset(o_shape_ijk, a_o, a_s)
    a_s[:3, 3] = offset
    if np.any(m_shape_ijk < 1):
        raise InvalidInputError(None, f"pixdim {list(map(float, out_d))} leaves an empty model grid")
    xform = np.linalg.solve(a_o, a_s)  # model voxel -> oriented input voxel
    unchanged = np.array_equal(m_shape_ijk, o_shape_ijk) and (
        np.allclose(a_o, a_s, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
    )
    if unchanged:  # MONAI returns the image as is, with the oriented affine
        return GridMapping(shape_kji, a_in, tuple(int(n) for n in o_shape_ijk[::-1]), a_o, tuple(orient_axes))  # type: ignore[arg-type]
    off_diag = np.abs(xform[:3, :3] - np.diag(np.diag(xform[:3, :3])))
    if np.any(off_diag * np.maximum(m_shape_ijk, 1)[None, :] > _SHEAR_TOL):
        raise InvalidInputError(None, "the volume's voxel axes are not orthogonal (sheared affine): "
                                      "model-space resampling needs a separable grid map")
    axes = []
    for s in range(3):
        ax = 2 - s
        scale, off = float(xform[ax, ax]), float(xform[ax, 3])
        if abs(scale - 1.0) < _SNAP:
            scale = 1.0
        if abs(off) < _SNAP:
            off = 0.0
        o = orient_axes[s]
        axes.append(AxisMap(o.source_axis, scale, off, o.flip, int(m_shape_ijk[ax])))
    return GridMapping(shape_kji, a_in, tuple(int(n) for n in m_shape_ijk[::-1]), a_s, tuple(axes))  # type: ignore[arg-type]


def _normalise(shape_ijk: Sequence[int]) -> np.ndarray:
    """MONAI's ``normalize_transform(align_corners=False)``: voxel index -> grid_sample's [-1, 1]."""
    shape = np.asarray(shape_ijk, dtype=np.float64)
    norm = np.diag(np.append(2.0 / shape, 1.0))
    norm[:-1, -1] = 1.0 / shape - 1.0
    return norm


def sampling_thetas(mapping: GridMapping, *, inverse: bool = False) -> tuple[tuple[float, float], ...]:
    """Per storage axis of the resampling's output, MONAI's normalised sampling (slope, intercept).

    The spacing step samples oriented input index ``offset + scale * m`` for
    model index ``m``; its inverse (``Invertd``) samples the model at the
    reverse.  MONAI computes these through ``to_norm_affine``'s normalised
    4x4 matrix; the same float64 operations here make nearest-neighbour ties
    fall as MONAI's do.  Diagonal by construction (``model_grid`` refuses shear).
    """
    a_o, a_s = mapping.oriented_affine, np.asarray(mapping.model_affine, dtype=np.float64)
    o_ijk, m_ijk = mapping.oriented_shape[::-1], mapping.model_shape[::-1]
    if inverse:
        xform, src, dst = np.linalg.solve(a_s, a_o), m_ijk, o_ijk
    else:
        xform, src, dst = np.linalg.solve(a_o, a_s), o_ijk, m_ijk
    theta = _normalise(src) @ xform @ np.linalg.inv(_normalise(dst))
    return tuple((float(theta[2 - s, 2 - s]), float(theta[2 - s, 3])) for s in range(3))


def monai_source_coords(index: np.ndarray, n_in: int, n_out: int, theta: tuple[float, float]) -> np.ndarray:
    """Continuous source indices MONAI samples for output ``index`` along one axis (float64).

    Mathematically ``offset + scale * index``; computed as ``affine_grid``
    (``align_corners=False``) and ``grid_sample``'s unnormalise do, from the
    normalised ``theta`` of ``sampling_thetas``.  Elementwise in ``index``:
    any chunk computes the same values.
    """
    index = np.asarray(index, dtype=np.float64)
    if n_out <= 1:
        g = np.zeros_like(index)
    else:  # torch.linspace(-1, 1, n_out) * (n_out - 1) / n_out, element by element
        step = (1.0 - -1.0) / (n_out - 1)
        g = np.where(index < n_out // 2, -1.0 + step * index, 1.0 - step * (n_out - index - 1))
        g = g * (n_out - 1) / n_out
    g_in = theta[0] * g + theta[1]
    return ((g_in + 1.0) * n_in - 1.0) / 2.0
