"""What checking deflate blocks against their checksum costs ingest (storage/deflatecheck.py).

    .venv/bin/python benchmarks/deflate_check.py [--size 4096] [--repeat 3]

Writes a 4-band uint16 deflate GeoTIFF (512² tiles, smooth pixels with noise, as a scene compresses) and
ingests it with and without the check, interleaved; prints the median seconds of each.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import storage.geotiff as geotiff  # noqa: E402
from storage.deflatecheck import DeflateBlocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 3000, (4, args.size // 16, args.size // 16)).astype(np.uint16)
    pixels = np.repeat(np.repeat(coarse, 16, 1), 16, 2) + rng.integers(0, 30, (4, args.size, args.size), np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.tif"
        with rasterio.open(path, "w", driver="GTiff", width=args.size, height=args.size, count=4, dtype="uint16",
                           tiled=True, blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32633",
                           transform=from_origin(500000, 6000000, 10, 10)) as dst:
            dst.write(pixels)
        times: dict[str, list[float]] = {"with the check": [], "without": []}
        checked = DeflateBlocks.of  # bound before the class attribute is swapped below
        for _ in range(args.repeat):
            for name in times:
                geotiff.DeflateBlocks.of = checked if name == "with the check" else (lambda *a, **k: None)
                store = Path(tmp) / "scene.zarr"
                shutil.rmtree(store, ignore_errors=True)
                t0 = time.perf_counter()
                geotiff.ingest_geotiff(path, store, chunk=1024)
                times[name].append(time.perf_counter() - t0)
        geotiff.DeflateBlocks.of = checked
        print(f"{args.size}² × 4 uint16, deflate, {path.stat().st_size / 1e6:.0f} MB on disk, "
              f"{pixels.nbytes / 1e6:.0f} MB of pixels")
        for name, values in times.items():
            print(f"- ingest {name}: median {statistics.median(values):.2f} s "
                  f"({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
