#!/usr/bin/env bash
# Fetch, here, the wheels a lent GPU machine lacks for benchmarks/gpu_check.sh, into .whl/ (git-ignored).
#
# The GPU machine has Python 3.12 with torch, numpy, scipy, rich, typer, pytest ... but not MONAI, Dask, zarr,
# pydantic, rasterio, pydicom, nibabel or dask-cuda, and it cannot download anything
# (/work/.library/device/README.md).  Each wheel is the version this machine's .venv has (dask-cuda: the newest),
# built for CPython 3.12 on manylinux x86_64; --no-deps, so every missing dependency is named here.  About 60 MB: with
# the working tree it fits the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
NEED=(monai dask distributed donfig locket partd zict tblib tornado zarr numcodecs google-crc32c pydantic
      pydantic_core annotated-types typing-inspection rasterio affine cligj click-plugins pydicom nibabel
      importlib_metadata lazy-importer pystac stac-model)
rm -rf .whl && mkdir -p .whl
for name in "${NEED[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  "${PIP[@]}" "$name==$version" 2>&1 | grep -v "is ignored" || true
done
"${PIP[@]}" dask-cuda 2>&1 | grep -v "is ignored" || true
ls .whl | wc -l
du -sh .whl
