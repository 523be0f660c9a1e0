"""Reproducible synthetic inputs: a land-cover scene (GeoTIFF) and an MR-like phantom (NIfTI).

No data can be downloaded where segflow is built and tested, yet the demo, the
benchmarks and the tests need inputs with real georeferencing and a known
truth. These generators draw both from a seed alone (same seed, same bytes),
with pure numpy, and write them with the same libraries users' files come from.

The scenes and phantoms are easy enough for a small network to learn within a
minute of CPU, but not trivially: classes overlap spectrally (green crops vs
forest, scalp vs brain), so a model must also use texture and context.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path

import numpy as np

# Land-cover classes of the scene truth (the demo card names them the same way).
WATER, FOREST, CROPLAND, ROAD, BUILT_UP = 0, 1, 2, 3, 4
SCENE_CLASSES = ("water", "forest", "cropland", "road", "built-up")
SCENE_BANDS = ("blue", "green", "red", "nir")
SCENE_EPSG = 32633
SCENE_PIXEL = 10.0
SCENE_NODATA = 0
TRUTH_NODATA = 255

# Phantom classes.
BACKGROUND, TISSUE, LESION = 0, 1, 2
PHANTOM_CLASSES = ("background", "tissue", "lesion")
PHANTOM_ZOOMS = (1.0, 1.0, 1.5)

# Mean reflectance x 10000 (blue, green, red, nir) of each surface.
_WATER = (700.0, 600.0, 350.0, 150.0)
_FOREST = (280.0, 480.0, 300.0, 2800.0)
_CROPS = (
    (400.0, 750.0, 450.0, 3800.0),    # dense green crop
    (600.0, 850.0, 800.0, 2600.0),    # young crop
    (1000.0, 1250.0, 1550.0, 2100.0),  # bare soil
    (900.0, 1100.0, 1300.0, 2600.0),  # stubble
    (450.0, 800.0, 600.0, 3300.0),    # meadow
)
_ROAD = (1300.0, 1400.0, 1500.0, 1700.0)
_PAVEMENT = (850.0, 900.0, 950.0, 1300.0)
_ROOFS = (
    (700.0, 800.0, 1700.0, 1900.0),   # red tiles
    (1600.0, 1600.0, 1650.0, 1800.0),  # concrete
    (450.0, 470.0, 500.0, 650.0),     # dark roofing
)


def truth_path(path: str | PathLike[str]) -> Path:
    """``scene.tif`` -> ``scene.truth.tif``, ``phantom.nii.gz`` -> ``phantom.truth.nii.gz``."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".tiff", ".tif"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".truth" + ext)
    return path.with_name(name + ".truth")


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit std (FFT: no scipy needed)."""
    sigmas = (sigma,) * len(shape) if np.isscalar(sigma) else tuple(sigma)
    spectrum = np.fft.rfftn(rng.standard_normal(shape))
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij", sparse=True)
    spectrum *= np.exp(-2.0 * math.pi ** 2 * sum((s * g) ** 2 for s, g in zip(sigmas, grids)))
    out = np.fft.irfftn(spectrum, s=shape)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


# --------------------------------------------------------------------------- scene

def _parcels(rng: np.random.Generator, y0: int, x0: int, h: int, w: int,
             out: list[tuple[int, int, int, int]]) -> None:
    """Split a rectangle recursively into field parcels of ~40-130 px."""
    if (h < 130 and w < 130 and rng.random() < 0.6) or (h < 80 and w < 80):
        out.append((y0, x0, h, w))
        return
    if h >= w:
        cut = int(h * rng.uniform(0.35, 0.65))
        _parcels(rng, y0, x0, cut, w, out)
        _parcels(rng, y0 + cut, x0, h - cut, w, out)
    else:
        cut = int(w * rng.uniform(0.35, 0.65))
        _parcels(rng, y0, x0, h, cut, out)
        _parcels(rng, y0, x0 + cut, h, w - cut, out)


def _polyline_distance(yy: np.ndarray, xx: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of every pixel to a polyline given as (n, 2) (y, x) vertices."""
    dist = np.full(np.broadcast_shapes(yy.shape, xx.shape), np.inf)
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        dy, dx = by - ay, bx - ax
        t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
        np.minimum(dist, np.hypot(yy - ay - t * dy, xx - ax - t * dx), out=dist)
    return dist


def _road_line(rng: np.random.Generator, h: int, w: int, horizontal: bool) -> np.ndarray:
    """A gently bending road crossing the scene from one side to the other."""
    n = 6
    along = np.linspace(-0.1, 1.1, n) * (w if horizontal else h)
    base = rng.uniform(0.2, 0.8) * (h if horizontal else w)
    slope = rng.uniform(-0.35, 0.35)
    across = base + slope * (along - along.mean()) + np.cumsum(rng.normal(0, 12, n))
    return np.stack([across, along], 1) if horizontal else np.stack([along, across], 1)


def _scene_arrays(size: tuple[int, int], seed: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """(4, H, W) uint16 reflectance and (H, W) uint8 truth."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    labels = np.full((h, w), CROPLAND, np.uint8)
    refl = np.zeros((4, h, w), np.float64)

    # Fields: parcels with one crop each, per-parcel tint and row stripes.
    parcels: list[tuple[int, int, int, int]] = []
    _parcels(rng, 0, 0, h, w, parcels)
    for (py, px, ph, pw) in parcels:
        crop = np.asarray(_CROPS[rng.integers(len(_CROPS))]) * rng.uniform(0.9, 1.1, 4)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(3.0, 7.0)
        ys, xs = yy[py:py + ph, px:px + pw], xx[py:py + ph, px:px + pw]
        stripes = 1.0 + rng.uniform(0.02, 0.07) * np.sin(
            2 * math.pi * (ys * math.sin(angle) + xs * math.cos(angle)) / period)
        refl[:, py:py + ph, px:px + pw] = crop[:, None, None] * stripes
    grain = _smooth(rng, (h, w), 2.0)
    refl *= 1.0 + 0.03 * grain

    # Forest: large smooth blobs, blotchy canopy texture (crowns and shadows).
    forest = _smooth(rng, (h, w), 45.0) > 0.45
    canopy = 1.0 + 0.18 * _smooth(rng, (h, w), 1.3)
    refl[:, forest] = (np.asarray(_FOREST)[:, None] * canopy[forest])
    labels[forest] = FOREST

    # Water: a meandering river and a lake.
    river_x = w * rng.uniform(0.25, 0.75) + 60 * np.sin(yy[:, :1] / h * rng.uniform(3, 6) + rng.uniform(0, 6)) \
        + 40 * _smooth(rng, (h, 1), (80.0, 1.0))
    river_w = rng.uniform(7, 11) + 3 * _smooth(rng, (h, 1), (60.0, 1.0))
    lake = _smooth(rng, (h, w), 35.0) > 2.0
    water = (np.abs(xx - river_x) < river_w) | lake
    depth = 1.0 + 0.06 * _smooth(rng, (h, w), 8.0)
    refl[:, water] = np.asarray(_WATER)[:, None] * depth[water]
    labels[water] = WATER

    # Roads: two or three crossing lines, 4-6 px wide, flat and bright.
    roads = [_road_line(rng, h, w, True), _road_line(rng, h, w, False)]
    if rng.random() < 0.6:
        roads.append(_road_line(rng, h, w, bool(rng.integers(2))))
    road_mask = np.zeros((h, w), bool)
    for line in roads:
        road_mask |= _polyline_distance(yy, xx, line) < rng.uniform(2.0, 3.0)

    # Built-up: a settlement around the first crossing: pavement plus roofs.
    cy, cx = np.mean([roads[0][2:4, 0].mean(), roads[1][2:4, 0].mean()]), \
        np.mean([roads[0][2:4, 1].mean(), roads[1][2:4, 1].mean()])
    ry, rx = rng.uniform(40, 70), rng.uniform(40, 70)
    town = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0 + 0.25 * _smooth(rng, (h, w), 12.0)
    town &= ~water
    refl[:, town] = np.asarray(_PAVEMENT)[:, None] * (1.0 + 0.05 * grain[town])
    for _ in range(int(ry * rx / 40)):
        by, bx = rng.uniform(cy - ry, cy + ry), rng.uniform(cx - rx, cx + rx)
        bh, bw = rng.integers(4, 11, 2)
        y0, x0 = int(np.clip(by, 0, h - 1)), int(np.clip(bx, 0, w - 1))
        roof = town[y0:y0 + bh, x0:x0 + bw]
        refl[:, y0:y0 + bh, x0:x0 + bw][:, roof] = (
            np.asarray(_ROOFS[rng.integers(len(_ROOFS))]) * rng.uniform(0.9, 1.1))[:, None]
    labels[town] = BUILT_UP

    refl[:, road_mask] = np.asarray(_ROAD)[:, None] * rng.uniform(0.95, 1.05)
    labels[road_mask] = ROAD

    # Atmosphere and sensor: smooth illumination, blue haze, per-pixel noise.
    refl *= 1.0 + 0.07 * _smooth(rng, (h, w), 150.0)
    refl[0] += 80.0 * (1.0 + _smooth(rng, (h, w), 120.0))
    refl += rng.normal(0.0, 1.0, refl.shape) * (0.03 * refl + 25.0)
    image = np.clip(np.rint(refl), 1, 10000).astype(np.uint16)

    # No-data margin: a straight one on the left, a slanted one along the top.
    if margin > 0:
        nodata = (xx < margin) | (yy < margin * (1.0 - xx / w))
        image[:, nodata] = SCENE_NODATA
        labels[nodata] = TRUTH_NODATA
    return image, labels


def make_scene(path: str | PathLike[str], *, size: tuple[int, int] = (768, 768), seed: int,
               nodata_margin: int = 24) -> tuple[Path, Path]:
    """Write a 4-band (blue, green, red, nir) uint16 GeoTIFF and its truth beside it.

    The image is reflectance x 10000 on a 10 m UTM 33N grid, nodata 0, tiled
    256 and deflate-compressed; the truth (``<name>.truth.tif``) is uint8 on
    the same grid with classes 0 water, 1 forest, 2 cropland, 3 road,
    4 built-up and 255 where the image has no data. Returns (image, truth).
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    path = Path(path)
    image, labels = _scene_arrays(tuple(size), seed, nodata_margin)
    h, w = labels.shape
    # A Sentinel-2-like tile origin, shifted per seed so scenes do not coincide.
    rng = np.random.default_rng([seed, 1])
    transform = from_origin(399960.0 + 10.0 * int(rng.integers(0, 5000)),
                            5800020.0 - 10.0 * int(rng.integers(0, 5000)), SCENE_PIXEL, SCENE_PIXEL)
    profile = dict(driver="GTiff", width=w, height=h, crs=CRS.from_epsg(SCENE_EPSG), transform=transform,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(path, "w", count=4, dtype="uint16", nodata=SCENE_NODATA, **profile) as dst:
        dst.write(image)
        for i, name in enumerate(SCENE_BANDS, 1):
            dst.set_band_description(i, name)
        dst.update_tags(generator="segflow.storage.samples.make_scene", seed=str(seed))
    truth = truth_path(path)
    with rasterio.open(truth, "w", count=1, dtype="uint8", nodata=TRUTH_NODATA, **profile) as dst:
        dst.write(labels, 1)
        dst.set_band_description(1, "land cover")
        dst.write_colormap(1, {0: (30, 90, 200), 1: (20, 110, 40), 2: (230, 200, 90),
                               3: (90, 90, 90), 4: (200, 40, 40)})
    return path, truth


# --------------------------------------------------------------------------- phantom

def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A small random rotation (about x, then y, then z)."""
    a, b, c = np.radians(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _phantom_arrays(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) int16 intensities and uint8 truth, in voxel (i, j, k) order."""
    rng = np.random.default_rng(seed)
    zooms = np.asarray(PHANTOM_ZOOMS)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, zooms)],
                       indexing="ij", sparse=True)  # mm from the volume centre
    extent = np.asarray(shape) * zooms / 2

    def ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))

    # Head: scalp (background), a dark skull gap, then brain tissue.
    centre = rng.uniform(-3, 3, 3)
    brain_r = extent * rng.uniform(0.68, 0.76, 3)
    r2_brain = ellipsoid(centre, brain_r)  # squared normalised radius
    brain = r2_brain < 1.0 + 0.04 * _smooth(rng, shape, 6.0)
    head = ellipsoid(centre, brain_r + 9.0) < 1.0
    skull = ellipsoid(centre, brain_r + 5.0) < 1.0

    signal = np.zeros(shape)
    signal[head] = 520.0
    signal[skull] = 90.0
    texture = 1.0 + 0.08 * _smooth(rng, shape, 2.0)  # grey/white matter mottling
    signal[brain] = 650.0 * texture[brain]
    labels = np.zeros(shape, np.uint8)
    labels[brain] = TISSUE

    # Ventricles: two dark ellipsoids inside the brain, labelled tissue.
    taken = np.zeros(shape, bool)
    for side in (-1, 1):
        vc = centre + np.array([side * rng.uniform(6, 10), rng.uniform(-4, 4), rng.uniform(0, 6)])
        rho_v = ellipsoid(vc, rng.uniform([3, 10, 5], [5, 16, 8]))
        signal[(rho_v < 1.0) & brain] = 260.0
        taken |= rho_v < 1.6

    # Lesions: 2-5 bright ellipsoids well inside the brain, apart from each other and the ventricles.
    n_lesions = int(rng.integers(2, 6))
    placed = 0
    for _ in range(200):
        if placed == n_lesions:
            break
        radii = rng.uniform(4, 12) * rng.uniform(0.8, 1.2, 3) * zooms  # voxels -> mm
        lc = centre + rng.uniform(-1, 1, 3) * np.maximum(brain_r - radii - 4, 1)
        rho = np.sqrt(ellipsoid(lc, radii))
        inside = rho < 1.0
        if (inside & (taken | (r2_brain > 0.8))).any() or not inside.any():
            continue
        # One voxel of partial volume at the rim, centred on the labelled boundary:
        # (1 - rho) / |grad rho| is the distance to the surface, here in voxels.
        grad = np.sqrt(sum(((g - c) * z / (r * r)) ** 2 for g, c, r, z in zip(grid, lc, radii, zooms)))
        edge = np.clip((1.0 - rho) * rho / np.maximum(grad, 1e-6) + 0.5, 0.0, 1.0)
        brightness = rng.uniform(1.6, 1.9) * (1.0 + 0.05 * texture - 0.05)
        signal = signal * (1.0 + (brightness - 1.0) * edge * (r2_brain < 1.0))
        labels[inside] = LESION
        taken |= rho < 1.4
        placed += 1

    # Scanner: smooth bias field and Rician noise.
    bias = 1.0 + 0.12 * _smooth(rng, shape, 25.0)
    signal *= bias
    noise = 22.0
    signal = np.hypot(signal + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    return np.clip(np.rint(signal), 0, 32767).astype(np.int16), labels


def phantom_affine(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Anisotropic (1 x 1 x 1.5 mm), slightly rotated voxel-to-RAS affine centred near the origin."""
    rng = np.random.default_rng([seed, 2])
    affine = np.eye(4)
    affine[:3, :3] = _rotation(rng, 8.0) @ np.diag(PHANTOM_ZOOMS)
    centre = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = rng.uniform(-5, 5, 3) + np.array([0.0, -15.0, 10.0]) - affine[:3, :3] @ centre
    return affine


def make_phantom(path: str | PathLike[str], *, shape: tuple[int, int, int] = (96, 96, 64),
                 seed: int) -> tuple[Path, Path]:
    """Write an MR-like int16 NIfTI phantom and its uint8 truth beside it.

    A head (scalp, dark skull, brain with ventricles) under a smooth bias field
    and Rician noise, holding 2-5 bright ellipsoid lesions of radius ~4-12
    voxels. The affine has 1 x 1 x 1.5 mm voxels and a small rotation, stored
    as qform (code 1, scanner) and sform (code 2, aligned). The truth
    (``<name>.truth.nii.gz``: 0 background, 1 tissue, 2 lesion) has the same
    affine and codes and the NIfTI label intent. Returns (image, truth).
    """
    import nibabel as nib

    path = Path(path)
    shape = tuple(int(n) for n in shape)
    data, labels = _phantom_arrays(shape, seed)
    affine = phantom_affine(shape, seed)

    def write(array: np.ndarray, target: Path, *, label: bool) -> None:
        header = nib.Nifti1Header()
        header.set_data_dtype(array.dtype)
        header.set_xyzt_units("mm", "sec")
        img = nib.Nifti1Image(array, affine, header)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
        if label:
            img.header.set_intent("label")
            img.header["cal_min"], img.header["cal_max"] = 0, 2
        img.header["descrip"] = b"segflow phantom" + (b" truth" if label else b"")
        img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, str(target))

    truth = truth_path(path)
    write(data, path, label=False)
    write(labels, truth, label=True)
    return path, truth
