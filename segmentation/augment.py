"""Training-time augmentation of (image, labels) patches: geometry that keeps labels exact, rotation and
scale, and intensity.

Small training sets (a few dozen buildings in one scene, one MR volume) are
learnt by heart unless every patch looks a little different. Mirror images
and, for square 2-D patches, transposes are free: a scene from above has no
preferred orientation and the labels move with the pixels. A random rotation
and scale (:func:`affine`) shows the same few buildings at every angle and
size in between: the image is resampled bilinearly, the labels by nearest
neighbour, and what the turn brings in from outside the patch is ignored by
the loss. Intensity changes (contrast, brightness, noise) apply to the
normalised image only; they teach the network that a darker or flatter
acquisition, or the other half of a scene whose percentiles differ, holds
the same classes. Each draw comes from the caller's generator, so a seeded
run is repeatable, and with an augmentation off the generator sees exactly
the draws it saw before that augmentation existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Augmentation", "affine", "dihedral", "intensity", "CONTRAST", "BRIGHTNESS", "NOISE", "ROTATION_2D",
           "ROTATION_3D", "SCALE"]

CONTRAST = (0.75, 1.25)  # factor on the deviation from the patch's per-channel mean
BRIGHTNESS = 0.2  # shift, in units of the patch's per-channel standard deviation, drawn in ±this
NOISE = 0.05  # Gaussian noise, in the same units, standard deviation drawn in [0, this]
ROTATION_2D = 180.0  # degrees, drawn in ±this: a scene from above or a slide has no preferred orientation
ROTATION_3D = 15.0  # degrees, in the plane of the last two axes (in-plane for (z, y, x) volumes): anatomy has one
SCALE = (0.8, 1.25)  # isotropic zoom factor, drawn log-uniformly


@dataclass(frozen=True)
class Augmentation:
    """What training does to patches beyond flips: the share (0-1) of patches given a random intensity change,
    and the share given a random rotation and scale. Both off by default, so seeded runs repeat exactly."""

    intensity: float = 0.0
    spatial: float = 0.0

    def problem(self) -> str | None:
        """Why these shares cannot be used (one line), or None."""
        for name, share in (("intensity", self.intensity), ("spatial", self.spatial)):
            if not 0.0 <= share <= 1.0:
                return f"the {name} augmentation's share must be in [0, 1], got {share:g}"
        return None

    def run_fields(self) -> dict[str, float]:
        """What identifies them in a resumable run's record: only those that are on, so runs from before an
        augmentation existed still resume."""
        return {k: v for k, v in (("intensity", self.intensity), ("spatial", self.spatial)) if v}

    def describe(self, spatial_dims: int) -> str:
        """The provenance's words for everything done to patches."""
        out = "flips" + (", transposes" if spatial_dims == 2 else "")
        if self.spatial:
            turn = ROTATION_2D if spatial_dims == 2 else ROTATION_3D
            out += (f", rotation (±{turn:g}°{'' if spatial_dims == 2 else ' in the last two axes'}) and scale "
                    f"({SCALE[0]:g}-{SCALE[1]:g}) on {self.spatial:g} of patches")
        if self.intensity:
            out += (f", intensity on {self.intensity:g} of patches (contrast {CONTRAST}, brightness "
                    f"±{BRIGHTNESS} sd, noise ≤ {NOISE} sd)")
        return out


def dihedral(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip per spatial axis, and for square 2-D patches a random transpose (views, not copies)."""
    for axis in range(lab.ndim):
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
    if lab.ndim == 2 and lab.shape[0] == lab.shape[1] and rng.random() < 0.5:
        img, lab = img.transpose(0, 2, 1), lab.T  # 2-D scenes have no preferred orientation
    return img, lab


def intensity(img: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """With ``probability``: contrast, brightness and noise per channel of a normalised (C, *spatial) patch."""
    if probability <= 0.0 or rng.random() >= probability:
        return img
    out = np.array(img, dtype=np.float32, copy=True)
    axes = tuple(range(1, out.ndim))
    mean = out.mean(axis=axes, keepdims=True)
    std = out.std(axis=axes, keepdims=True) + np.float32(1e-6)
    channels = (out.shape[0],) + (1,) * (out.ndim - 1)
    contrast = rng.uniform(*CONTRAST, size=channels).astype(np.float32)
    shift = rng.uniform(-BRIGHTNESS, BRIGHTNESS, size=channels).astype(np.float32)
    out -= mean
    out *= contrast
    out += mean + shift * std
    sigma = np.float32(rng.uniform(0.0, NOISE))
    out += rng.standard_normal(out.shape, dtype=np.float32) * (sigma * std)
    return out


def affine(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, probability: float,
           ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """With ``probability``: rotate and scale a (C, *spatial) patch and its labels about the patch centre.

    2-D patches turn by any angle, 3-D ones by up to :data:`ROTATION_3D` in
    the plane of their last two axes; both zoom by a factor in :data:`SCALE`.
    The image is interpolated linearly, the labels take the nearest pixel's,
    and pixels that come from outside the patch get 0 in the image and
    ``ignore`` in the labels (they add no loss).
    """
    from scipy import ndimage

    if probability <= 0.0 or rng.random() >= probability:
        return img, lab
    limit = np.deg2rad(ROTATION_2D if lab.ndim == 2 else ROTATION_3D)
    angle = rng.uniform(-limit, limit)
    zoom = float(np.exp(rng.uniform(np.log(SCALE[0]), np.log(SCALE[1]))))
    matrix = np.eye(lab.ndim)
    c, s = np.cos(angle) / zoom, np.sin(angle) / zoom  # output -> input coordinates: the inverse turn and zoom
    matrix[-2:, -2:] = [[c, -s], [s, c]]
    if lab.ndim == 3:
        matrix[0, 0] = 1.0 / zoom
    centre = (np.asarray(lab.shape, dtype=np.float64) - 1.0) / 2.0
    offset = centre - matrix @ centre
    kw: dict[str, Any] = {"mode": "constant", "prefilter": False}
    labels = ndimage.affine_transform(lab, matrix, offset, order=0, cval=ignore, **kw)
    image = np.stack([ndimage.affine_transform(np.asarray(ch, dtype=np.float32), matrix, offset, order=1,
                                               cval=0.0, **kw) for ch in img])
    return image, labels
