#!/usr/bin/env bash
# Issue 12's checks on a lent GPU machine, as one short script: `run` it from the repository root with
# carry [".whl"] (made here by benchmarks/device_wheels.sh) and a timeout of about 9 minutes.
#
#   the CUDA tests; predict_vs_monai.py at 2D 8192² and 3D 256³ on the GPU (recorded in docs/performance.md's
#   blocks predict-2d-gpu and predict-3d-gpu); `segflow segment --gpus` end to end (gpu_segment.py, block
#   gpu-segment).  Logs, a summary and the updated docs/performance.md land in $OUT; copy the blocks back from it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...: its log in $OUT/NAME.log, its exit status and time in the summary
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_resident.py \
  tests/test_dask_address.py -k "cuda or gpu or device or turns"
step predict-2d 180 python3 benchmarks/predict_vs_monai.py --size 8192 --roi 256 --batch 8 --chunk 1024 --workers 1 \
  --threads-per-worker 2 --device cuda --repeat 3 --record predict-2d-gpu
step predict-3d 120 python3 benchmarks/predict_vs_monai.py --dims 3 --size 256 --roi 96 --batch 2 --chunk 128 \
  --workers 1 --threads-per-worker 2 --device cuda --repeat 3 --record predict-3d-gpu
step gpu-segment 120 python3 benchmarks/gpu_segment.py --size 4096 --record gpu-segment
cp docs/performance.md "$OUT/performance.md"
