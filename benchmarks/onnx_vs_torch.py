"""Does onnxruntime beat torch on this CPU? The same U-Net, exported to ONNX, against torch fp32 and bf16.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--dims 2 3] [--record onnx]

Needs ``onnx`` and ``onnxruntime`` (not segflow dependencies: they are only
worth adding if this measures a gain). The network is MONAI's U-Net (16, 32,
64, 128) as segflow's workers prepare it (BatchNorm folded, channels-last);
ONNX Runtime gets the exported graph with all graph optimisations on and
``intra_op_num_threads`` equal to torch's thread count. One batch of windows
(2D 8 × 256², 3D 2 × 96³), after warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from segmentation.netprep import fold_batch_norm  # noqa: E402
from segmentation.models import create  # noqa: E402


def timed(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--reps", type=int, default=5)
    report.add_argument(ap)
    args = ap.parse_args()
    import onnxruntime as ort

    lines = [f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| input | torch fp32 ms | torch bf16 ms | ONNX Runtime fp32 ms | ORT vs torch fp32 | ORT vs torch bf16 "
             "| max abs diff of ORT logits |", "|---|---|---|---|---|---|---|"]
    for d in args.dims:
        torch.manual_seed(0)
        net = create("unet", spatial_dims=d, in_channels=3, out_channels=5, channels=[16, 32, 64, 128],
                     strides=[2, 2, 2], num_res_units=1).eval()
        fmt = torch.channels_last if d == 2 else torch.channels_last_3d
        shape = (8, 3, 256, 256) if d == 2 else (2, 3, 96, 96, 96)
        x = torch.rand(shape)
        prepared = fold_batch_norm(net, x[:1]).to(memory_format=fmt)
        xc = x.contiguous(memory_format=fmt)

        def run_torch(bf16: bool, prepared: torch.nn.Module = prepared, xc: torch.Tensor = xc) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return prepared(xc)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.onnx"
            torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            xn = x.numpy()
            ref = run_torch(False).float().numpy()
            diff = float(np.abs(sess.run(None, {"x": xn})[0] - ref).max())
            t_fp32 = timed(lambda: run_torch(False), args.reps)
            t_bf16 = timed(lambda: run_torch(True), args.reps)
            t_ort = timed(lambda sess=sess, xn=xn: sess.run(None, {"x": xn}), args.reps)
        lines.append(f"| {d}D {' × '.join(map(str, shape))} | {t_fp32 * 1e3:.1f} | {t_bf16 * 1e3:.1f} | "
                     f"{t_ort * 1e3:.1f} | {t_fp32 / t_ort:.2f}× | {t_bf16 / t_ort:.2f}× | {diff:.1e} |")
        print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if args.record:
        report.record(args.record, body, doc=report.DOC.parent / "models.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
