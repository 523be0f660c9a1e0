"""The raster way back alone, in one process: is it linear in time and flat in memory?

    .venv/bin/python benchmarks/warp_wayback.py [--sizes 8192 16384] [--record warp-wayback]

``benchmarks/warp.py`` measures whole ``segflow segment`` runs, where run A's
Dask worker grows with the scene.  This isolates the way back: a 10 m model
grid of 4-class float32 probabilities (random per chunk, so nearly every input
pixel sits at a label boundary and takes the interpolated branch: the worst
case) is staged chunk by chunk and brought back to the 5 m input grid as
labels (:class:`storage.wayback.RasterWayBack`, bilinear), stored into a zarr
array, on dask's threaded scheduler (2 threads).  Each size runs in its own
subprocess so its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

CHUNK = 1024


def one(size: int, folder: Path) -> dict:
    """Time and peak RSS of the way back for a ``size``² input grid (runs in the calling process)."""
    import dask
    import dask.array as da
    import numpy as np
    import zarr
    from rasterio.crs import CRS

    from storage.geometry import RasterGeometry
    from storage.rastergrid import raster_mapping
    from storage.wayback import RasterWayBack

    geometry = RasterGeometry(width=size, height=size, crs_wkt=CRS.from_epsg(32633).to_wkt(), epsg=32633,
                              transform=(5.0, 0.0, 500000.0, 0.0, -5.0, 5e6), dtype="uint16")
    mapping = raster_mapping(geometry, (size, size), spacing=[10.0, 10.0], crs=None, resampling="auto")

    def random_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        rows, cols = block_info[0]["array-location"][1:]
        return np.random.default_rng(rows[0] * 131 + cols[0]).random(block.shape, dtype=np.float32)

    probs = da.zeros((4, *mapping.model_shape), chunks=(4, CHUNK, CHUNK), dtype=np.float32)
    probs = probs.map_blocks(random_block, dtype=np.float32)
    labels = RasterWayBack(mapping, None, stage=folder / "staged").labels(probs, (CHUNK, CHUNK), "bilinear",
                                                                          np.uint8)
    out = zarr.create_array(str(folder / "labels"), shape=labels.shape, chunks=(CHUNK, CHUNK), dtype=np.uint8)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        da.store(labels, out)
    seconds = time.perf_counter() - t0
    return {"size": size, "model": list(mapping.model_shape), "seconds": round(seconds, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--record", help="write the table into docs/performance.md under this key")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size here
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.one, Path(tmp))))
        return 0
    rows = []
    for size in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(size)], check=True, capture_output=True,
                              text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["Random 4-class probabilities on the 10 m model grid, staged and brought back to the 5 m input grid as "
             "labels (bilinear, nearly every pixel interpolated), 1024² chunks, dask threads (2), one process "
             "per size.", "",
             "| input grid | model grid | seconds | Mpx/s | peak RSS GB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']}² | {r['model'][0]}×{r['model'][1]} | {r['seconds']} | "
                     f"{r['size'] ** 2 / 1e6 / r['seconds']:.1f} | {r['peak_rss_gb']} |")
    body = "\n".join(lines)
    report.publish(body, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
