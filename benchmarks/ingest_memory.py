"""Peak memory of ingest and COG export against raster size (they must not grow with it).

    .venv/bin/python benchmarks/ingest_memory.py [--sizes 2048 8192]

Each size runs in a fresh subprocess, so every peak RSS (ru_maxrss) is that
size's own. The raster is a generated 3-band uint8 GeoTIFF, tiled 512.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
size, tmp = int(sys.argv[1]), Path(sys.argv[2])
src = tmp / f"in{size}.tif"
with rasterio.open(src, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 6000000, 10, 10), nodata=0, tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate") as dst:
    rng = np.random.default_rng(0)
    for y in range(0, size, 512):
        for x in range(0, size, 512):
            dst.write(rng.integers(1, 255, (3, 512, 512), dtype=np.uint8), window=Window(x, y, 512, 512))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from storage.cogwrite import write_label_cog
from storage.geotiff import ingest_geotiff
from storage.classes import LabelClass
t = time.perf_counter()
store = ingest_geotiff(src, tmp / f"s{size}.zarr", chunk=1024)
t_ingest = time.perf_counter() - t
after_ingest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
classes = [LabelClass(value=0, name="a"), LabelClass(value=1, name="b")]
import zarr
labels = zarr.create_array(str(tmp / f"l{size}.zarr"), shape=(size, size), chunks=(1024, 1024), dtype="uint8")
for y in range(0, size, 1024):
    for x in range(0, size, 1024):
        labels[y:y + 1024, x:x + 1024] = (np.asarray(store.image[0, y:y + 1024, x:x + 1024]) > 127).astype("uint8")
before_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
write_label_cog(labels, store.meta.geometry, tmp / f"out{size}.tif", classes=classes)
t_export = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": size, "raster_mb": 3 * size * size / 1e6, "rss_before_mb": base / 1024,
                  "peak_after_ingest_mb": after_ingest / 1024,
                  "peak_before_export_mb": before_export / 1024, "peak_after_export_mb": peak / 1024,
                  "ingest_s": t_ingest, "export_s": t_export}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    print("| raster | pixels MB | peak RSS (MB): before | after ingest | before export | after COG export "
          "| ingest s | export s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(size), tmp], capture_output=True, text=True,
                                 cwd=root, check=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {size}x{size}x3 uint8 | {r['raster_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['peak_after_ingest_mb']:.0f} | "
              f"{r['peak_before_export_mb']:.0f} | "
              f"{r['peak_after_export_mb']:.0f} | {r['ingest_s']:.1f} | {r['export_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
