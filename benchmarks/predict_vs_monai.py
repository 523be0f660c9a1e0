"""Side-by-side throughput: raw forward over the grid's windows, MONAI, segflow exact and fast.

    .venv/bin/python benchmarks/predict_vs_monai.py [--size 2048] [--device cpu|cuda] [--workers 2]

All four run the same U-Net on the same windows (segflow's grid is MONAI's),
in one process run, so the ratios are comparable even on a noisy machine.
Prints a Markdown table; also reports segflow-fast vs MONAI label agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation import build_plan  # noqa: E402
from segmentation.models import create  # noqa: E402
from segmentation.windows import make_grid  # noqa: E402


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dims", type=int, default=2, choices=[2, 3])
    ap.add_argument("--roi", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0, help="0: threads scheduler in-process; N: a LocalCluster")
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--dask-malloc", action="store_true",
                    help="keep Dask's MALLOC_TRIM_THRESHOLD_ in the workers (slower; for comparison)")
    ap.add_argument("--only-segflow", action="store_true", help="skip the raw and MONAI rows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = args.dims
    net = create("unet", spatial_dims=d, in_channels=3, out_channels=5, channels=[16, 32, 64, 128],
                 strides=[2, 2, 2], num_res_units=1).eval()
    shape = (args.size,) * d
    img = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    roi = (args.roi,) * d
    dev = torch.device(args.device)
    grid = make_grid(shape, roi, 0.25)
    fmt = torch.channels_last if d == 2 else torch.channels_last_3d
    gpu_net = net.to(dev).to(memory_format=fmt)

    def raw(precision: str) -> None:
        x = torch.from_numpy(img)
        windows = list(grid)
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch):
                batch = torch.stack([x[(slice(None),) + grid.slices(w)] for w in windows[i:i + args.batch]])
                batch = batch.to(dev).contiguous(memory_format=fmt)
                if precision == "fast":
                    with torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16):
                        torch.softmax(gpu_net(batch).float(), 1).cpu()
                else:
                    torch.softmax(gpu_net(batch), 1).cpu()

    def monai() -> np.ndarray:
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            out = sliding_window_inference(torch.from_numpy(img)[None].to(dev), roi, args.batch,
                                           lambda t: torch.softmax(gpu_net(t), 1), overlap=0.25, mode="gaussian")
        return out[0].argmax(0).cpu().numpy()

    import tempfile

    import zarr

    tmpdir = tempfile.TemporaryDirectory()
    # segflow reads a chunked zarr store, as the pipeline does (MONAI gets the array in memory)
    store = zarr.create_array(f"{tmpdir.name}/image.zarr", shape=img.shape, dtype="float32",
                              chunks=(3,) + (args.chunk,) * d)
    store[...] = img

    def segflow(precision: str, client=None) -> np.ndarray:  # noqa: ANN001
        plan = build_plan(store, net.cpu(), roi=roi, overlap=0.25, chunks=args.chunk, precision=precision,
                          batch_size=args.batch, device=args.device, num_classes=5)
        labels = plan.labels()
        return client.compute(labels).result() if client else labels.compute(scheduler="threads")

    client = None
    if args.workers:
        from distributed import Client, LocalCluster

        from flows.cluster import TorchThreads

        import dask

        from flows.cluster import worker_environ

        if not args.dask_malloc:
            dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                               dashboard_address=None)
        client = Client(cluster)
        client.register_plugin(TorchThreads(max(1, torch.get_num_threads() // (args.workers * args.threads_per_worker))))
    rows = {}
    if args.only_segflow:
        segflow("exact", client)  # warm-up
        ref = None
    else:
        raw("exact")  # warm-up (oneDNN/cuDNN kernel selection)
        _, rows["raw forward, exact"] = timed(lambda: raw("exact"))
        _, rows["raw forward, fast"] = timed(lambda: raw("fast"))
        ref, rows["MONAI sliding_window_inference (fp32)"] = timed(monai)
    gpu_net.to(torch.device("cpu"))
    exact, rows["segflow exact"] = timed(lambda: segflow("exact", client))
    fast, rows["segflow fast"] = timed(lambda: segflow("fast", client))
    mpx = np.prod(shape) / 1e6
    print(f"image {shape} x3, U-Net(16,32,64,128), roi {roi}, overlap 0.25, batch {args.batch}, "
          f"{len(grid)} windows, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else f", torch threads "
             f"{torch.get_num_threads()}") + f", segflow {'LocalCluster x%d' % args.workers if args.workers else 'threads'}")
    base = rows.get("MONAI sliding_window_inference (fp32)")
    print("| path | seconds | Mpx/s | vs MONAI fp32 |\n|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.2f} | {mpx / s:.2f} | " + (f"{base / s:.2f}x |" if base else "- |"))
    if ref is not None:
        print(f"segflow exact vs raw exact: {rows['raw forward, exact'] / rows['segflow exact']:.2f}x; "
              f"segflow fast vs raw fast: {rows['raw forward, fast'] / rows['segflow fast']:.2f}x")
        print(f"label agreement exact/MONAI {np.mean(exact == ref):.6f}, fast/MONAI {np.mean(fast == ref):.6f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "windows": len(grid), "shape": shape}))
    if client:
        client.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
