"""Time and peak memory of a quicklook of a huge raster and a big volume (issue 14: <= 5 s each, flat memory).

    .venv/bin/python benchmarks/quicklook.py [--size 32768] [--depths 250 1000] [--workdir DIR] [--keep]

Generates, block by block so the generator itself stays small:

* a ``size``² uint8 label GeoTIFF, tiled 512 with internal NEAREST overviews
  (a COG's layout), carrying segflow's ``CLASSES`` tag, and a 3-band uint8
  image of the same grid with AVERAGE overviews;
* for each of ``depths``, a 512x512x``depth`` uint8 label NIfTI and an int16
  image NIfTI, both ``.nii.gz`` as segflow writes labels, written slab by slab
  through gzip.

Then runs ``raster_quicklook`` and ``volume_quicklook`` each in a fresh Python
process and reports the call's own time, the process's wall time (start-up
and imports included), and the child's peak RSS (its own ``VmHWM``: Linux's ``ru_maxrss``
of a child starts from the parent's), beside its peak right after the imports, so the growth due to the quicklook
itself shows.  The volume quicklook runs at two depths so that flat memory
shows (or not) as the same peak for a volume four times the size: it should
hold slabs, block grids and the planes shown, never the label volume.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

STEP = 1024  # generator window
GOAL_S = 5.0
CLASSES = [{"value": 0, "name": "water", "color": [30, 90, 200]},
           {"value": 1, "name": "forest", "color": [20, 110, 40]},
           {"value": 2, "name": "cropland", "color": [230, 200, 90]},
           {"value": 3, "name": "road", "color": [90, 90, 90]},
           {"value": 4, "name": "built-up", "color": [200, 40, 40]}]


def _profile(size: int, count: int) -> dict:
    return dict(driver="GTiff", width=size, height=size, count=count, dtype="uint8", crs="EPSG:32633",
                transform=from_origin(400000, 6000000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                compress="deflate", zlevel=1, BIGTIFF="YES")


def _label_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
    """Fields of forest and cropland, a meandering river, a road grid and a few towns: cheap to compute anywhere."""
    yy, xx = np.mgrid[y:y + h, x:x + w]
    out = (1 + ((yy // 1500) * 3 + (xx // 1100) * 7) % 2).astype(np.uint8)  # 1 forest, 2 cropland
    out[((yy // 2500) * 5 + (xx // 2500) * 3) % 11 == 4] = 4  # built-up blocks
    out[(yy % 4000 < 3) | (xx % 5200 < 3)] = 3  # roads
    meander = 400 * np.sin(yy / 1300.0)
    out[np.abs((xx - 0.3 * yy - meander) % 12000 - 6000) < 40] = 0  # rivers
    return out


def make_raster(workdir: Path, size: int) -> tuple[Path, Path]:
    labels, image = workdir / "labels.tif", workdir / "image.tif"
    with rasterio.Env(GDAL_CACHEMAX=64):
        with rasterio.open(labels, "w", nodata=255, **_profile(size, 1)) as dst:
            for y in range(0, size, STEP):
                for x in range(0, size, STEP):
                    h, w = min(STEP, size - y), min(STEP, size - x)
                    dst.write(_label_tile(y, x, h, w), 1, window=Window(x, y, w, h))
            dst.write_colormap(1, {c["value"]: (*c["color"], 255) for c in CLASSES})
            dst.update_tags(CLASSES=json.dumps(CLASSES))
        with rasterio.open(labels, "r+") as dst:
            dst.build_overviews(_factors(size), Resampling.nearest)
        with rasterio.open(image, "w", **_profile(size, 3)) as dst:
            palette = np.array([[40, 60, 110], [40, 90, 50], [170, 160, 90], [120, 120, 120], [160, 90, 80]],
                               dtype=np.int16)
            for y in range(0, size, STEP):
                for x in range(0, size, STEP):
                    h, w = min(STEP, size - y), min(STEP, size - x)
                    lab = _label_tile(y, x, h, w)
                    texture = ((np.add.outer(np.arange(y, y + h), np.arange(x, x + w)) * 37) % 23).astype(np.int16)
                    rgb = np.clip(palette[lab] + texture[..., None] - 11, 0, 255).astype(np.uint8)
                    dst.write(np.moveaxis(rgb, -1, 0), window=Window(x, y, w, h))
            for b, name in enumerate(["red", "green", "blue"], start=1):
                dst.set_band_description(b, name)
        with rasterio.open(image, "r+") as dst:
            dst.build_overviews(_factors(size), Resampling.average)
    return labels, image


def _factors(size: int) -> list[int]:
    """Overview factors down to one 512 block, as GDAL's COG driver makes them."""
    return [2 ** n for n in range(1, max(2, math.ceil(math.log2(max(size / 512, 2)))) + 1)]


def _write_nifti(path: Path, shape: tuple[int, int, int], dtype: str, slab_of) -> None:  # noqa: ANN001
    """Header, then (I, J, slab) blocks in file order through gzip: never the whole volume."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_zooms((0.8, 0.8, 1.0))
    hdr.set_xyzt_units("mm")
    affine = np.diag([-0.8, -0.8, 1.0, 1.0])  # stored LPS, as DICOM-derived scans often are
    affine[:3, 3] = (0.8 * shape[0] / 2, 0.8 * shape[1] / 2, -shape[2] / 2)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * (int(hdr.get_data_offset()) - fh.tell()))
        for k0 in range(0, shape[2], 32):
            k1 = min(k0 + 32, shape[2])
            fh.write(np.asarray(slab_of(k0, k1), dtype=dtype).tobytes(order="F"))


def make_volume(workdir: Path, depth: int) -> tuple[Path, Path]:
    shape = (512, 512, depth)
    ii, jj = np.mgrid[:512, :512]

    def labels(k0: int, k1: int) -> np.ndarray:
        out = np.zeros((512, 512, k1 - k0), dtype=np.uint8)
        for n, k in enumerate(range(k0, k1)):
            z = (k - depth / 2) / (depth / 2)
            body = ((ii - 256) / 200.0) ** 2 + ((jj - 256) / 150.0) ** 2 + z ** 2 < 1
            organ = ((ii - 330) / 60.0) ** 2 + ((jj - 230) / 50.0) ** 2 + ((k - depth * 0.45) / (depth * 0.1)) ** 2 < 1
            lesion = ((ii - 180) ** 2 + (jj - 290) ** 2 + (k - depth * 0.6) ** 2) < 12 ** 2
            out[..., n][body] = 1
            out[..., n][organ] = 2
            out[..., n][lesion] = 3
        return out

    def image(k0: int, k1: int) -> np.ndarray:
        lab = labels(k0, k1)
        values = np.array([-1000, 40, 120, 200], dtype=np.int16)[lab]
        return values + ((ii[..., None] * 7 + jj[..., None] * 3 + np.arange(k0, k1)) % 21).astype(np.int16) - 10

    lab_path, img_path = workdir / "labels.nii.gz", workdir / "image.nii.gz"
    _write_nifti(lab_path, shape, "uint8", labels)
    _write_nifti(img_path, shape, "int16", image)
    return lab_path, img_path


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})

def hwm_kb():
    # VmHWM is this process's own peak (reset at exec); ru_maxrss starts from the parent's at fork on Linux
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

from storage.quicklook import raster_quicklook, volume_quicklook
base = hwm_kb()
t = time.perf_counter()
info = {call}
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "base_kb": base, "peak_kb": hwm_kb(), "size": info.path.stat().st_size,
                  "px": info.size, "extra": {extra}}}))
"""


def run_child(call: str, extra: str) -> dict:
    """One quicklook in a fresh interpreter, which reports its own time and peak RSS."""
    code = CHILD.format(root=str(ROOT), call=call, extra=extra)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall=wall, peak_mb=result["peak_kb"] / 1024, base_mb=result["base_kb"] / 1024)
    return result


def _flatness(by_depth: dict[int, dict]) -> str:
    """One sentence comparing the volume quicklook's growth in peak RSS with the label volume's growth."""
    depths = sorted(by_depth)
    sizes = ", ".join(f"{512 * 512 * d / 2 ** 20:.0f} MiB at {d} slices" for d in depths)
    text = (f"The volume's label map is {sizes} as uint8; it is never held whole: one streaming pass counts "
            "the classes and keeps a block grid per class, the largest components' boxes are read again, "
            "and only the planes shown are read from labels and image (a forward pass of bounded slabs "
            "through each gzip stream).")
    if len(depths) > 1:
        lo, hi = by_depth[depths[0]], by_depth[depths[-1]]
        grown = 512 * 512 * (depths[-1] - depths[0]) / 2 ** 20
        growth = (hi["peak_mb"] - hi["base_mb"]) - (lo["peak_mb"] - lo["base_mb"])
        text += (f" From {depths[0]} to {depths[-1]} slices the label volume grows by {grown:.0f} MiB; the "
                 f"quicklook's own peak (peak RSS less RSS after imports) by {growth:.0f} MiB "
                 f"({lo['peak_mb'] - lo['base_mb']:.0f} -> {hi['peak_mb'] - hi['base_mb']:.0f} MiB).")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32768, help="side of the label raster in pixels")
    ap.add_argument("--depths", type=int, nargs="+", default=[250, 1000],
                    help="slices of the 512x512 volumes, one quicklook (and process) each")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate the inputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs and PNGs")
    report.add_argument(ap)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segflow-quicklook-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        labels, image = make_raster(workdir, args.size)
        t_raster = time.perf_counter() - t
        t = time.perf_counter()
        volumes = {}
        for depth in args.depths:
            (workdir / f"volume-{depth}").mkdir(exist_ok=True)
            volumes[depth] = make_volume(workdir / f"volume-{depth}", depth)
        t_volume = time.perf_counter() - t
        print(f"generated in {workdir}: raster {t_raster:.0f} s, volumes {t_volume:.0f} s", file=sys.stderr)
        raster = run_child(f"raster_quicklook({str(labels)!r}, {str(workdir / 'raster.png')!r}, "
                           f"image_path={str(image)!r})",
                           "[info.read_shape, info.overview]")
        rows = [("raster_quicklook", f"{args.size}² uint8 labels + 3-band image, tiled, overviews",
                 f"read {raster['extra'][0][0]}x{raster['extra'][0][1]} from overview x{raster['extra'][1]}", raster)]
        by_depth = {}
        for depth, (vol_labels, vol_image) in volumes.items():
            r = run_child(f"volume_quicklook({str(vol_labels)!r}, {str(workdir / f'volume-{depth}.png')!r}, "
                          f"image_path={str(vol_image)!r})",
                          "[list(c) for c in info.centres]")
            by_depth[depth] = r
            rows.append(("volume_quicklook", f"512x512x{depth} uint8 labels + int16 image, .nii.gz, LPS",
                         f"{len(r['extra'])} row(s) of planes", r))
        lines = ["| call | input | what was read | call (s) | process wall (s) | RSS after imports (MiB) "
                 "| peak RSS (MiB) | PNG | goal |",
                 "|---|---|---|---:|---:|---:|---:|---|---|"]
        for name, what, read, r in rows:
            ok = "met" if r["seconds"] <= GOAL_S else "missed"
            lines.append(f"| {name} | {what} | {read} | {r['seconds']:.2f} | {r['wall']:.2f} | {r['base_mb']:.0f} "
                         f"| {r['peak_mb']:.0f} | {r['px'][0]}x{r['px'][1]} px, {r['size'] / 1e3:.0f} kB "
                         f"| <= {GOAL_S:g} s: {ok} |")
        notes = "\n".join(lines) + "\n\n" + _flatness(by_depth)
        print(notes)
        if args.record:
            report.record(args.record, notes)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
