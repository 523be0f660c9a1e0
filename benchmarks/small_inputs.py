"""What a small input pays beyond its windows (issue 12: "a 1-second model run should not take 2 s of scheduling").

    .venv/bin/python benchmarks/small_inputs.py [--sizes 256 512 1024 2048 4096] [--repeat 3] [--record small-inputs]

Per size, a scene of the demo's generator (``storage.samples.make_scene``, 4
bands of uint16) is segmented by ``segflow segment`` as a user runs it (a
fresh process, the demo's land-cover card with random weights, ``--precision
fast``, ``--no-zarr``, every other option its default), and the provenance's
``inference_seconds`` is taken: the stitched graph from its first window
task to its last label chunk stored.  Beside it, in this process, the raw
forward pass over the same windows: the network as segflow's workers prepare
it (BatchNorm folded, channels-last, bf16 autocast), the card's batch size,
the normalised image in memory, the same softmax, on as many torch threads as
cores.  What a run pays beyond its windows is the difference: reading the
store, stitching, the argmax, writing the label chunks, and Dask's scheduling
of the tasks that do it.  Start-up and export are not in it
(``benchmarks/startup.py`` measures those).  The rows are medians of
``--repeat`` runs, the raw passes and the runs interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def make_model(folder: Path) -> Path:
    """The demo's land-cover card with random weights (the timing does not depend on them)."""
    import torch

    from segmentation.demo_cards import landcover_card
    from segmentation.modeldir import build_module, save_model

    card = landcover_card().model_copy(update={"name": "landcover-2d-random"})
    torch.manual_seed(0)
    return save_model(folder / "model", card, build_module(card)).path


def segment(scene: Path, model: Path, out: Path) -> dict:
    """One ``segflow segment`` process; its provenance statistics."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model), "--out",
                           str(out), "--precision", "fast", "--no-zarr", "--quiet"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"segflow segment failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / f"{scene.stem}.provenance.json").read_text())["statistics"]


def raw_forward(scene: Path, model: Path) -> tuple[float, int]:
    """(seconds, windows) of the raw batched forward pass and softmax over the scene's windows, in memory."""
    import rasterio
    import torch

    from segmentation.inference import softmax_slabs
    from segmentation.netprep import fold_batch_norm
    from segmentation.modeldir import load_model
    from segmentation.normalize import resolve
    from segmentation.windows import make_grid

    loaded = load_model(model)
    card = loaded.card
    with rasterio.open(scene) as src:
        stored = src.read()
    image = torch.from_numpy(resolve(card.input.normalization, stored.shape[0])(stored))
    roi, batch = tuple(card.inference.roi), card.inference.batch_size
    grid = make_grid(image.shape[1:], roi, card.inference.overlap)
    windows = list(grid)
    net = fold_batch_norm(loaded.module.eval(), torch.rand((1, image.shape[0]) + roi)).to(
        memory_format=torch.channels_last)
    buf = torch.empty((batch, card.num_classes) + roi)
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            x = torch.stack([image[(slice(None),) + grid.slices(w)] for w in windows[i:i + batch]])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(x.contiguous(memory_format=torch.channels_last))
            for j in range(len(x)):  # in slabs of each window, as segflow's CPU workers take the softmax
                for _, _, e, scale in softmax_slabs(logits[j:j + 1], buf):
                    e.mul_(scale)
    return time.perf_counter() - t, len(windows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    report.add_argument(ap)
    args = ap.parse_args()
    from storage.samples import make_scene

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = make_model(tmp)
        for size in args.sizes:
            scene, _ = make_scene(tmp / f"scene{size}.tif", size=(size, size), seed=7)
            raw_forward(scene, model)  # warm-up: oneDNN's kernel choice
            raws, runs = [], []
            for rep in range(args.repeat):
                seconds, windows = raw_forward(scene, model)
                raws.append(seconds)
                stats = segment(scene, model, tmp / f"out{size}-{rep}")
                runs.append(stats)
                if stats["windows_total"] != windows:
                    raise SystemExit(f"{size}²: segment ran {stats['windows_total']} windows, the raw pass {windows}")
            raw = statistics.median(raws)
            inference = statistics.median(s["inference_seconds"] for s in runs)
            rows.append((size, windows, raw, inference, statistics.median(s["total_seconds"] for s in runs)))
            print(f"{size}²: {windows} windows, raw {raw:.3f} s, inference {inference:.3f} s", flush=True)
    lines = ["The demo's land-cover card (4-band U-Net (16, 32, 64, 128), ROI 128², batch 8) with random weights; "
             "`segflow segment --precision fast --no-zarr` in a fresh process (segment's defaults: chunks 1024², "
             f"its cluster in its own process); the raw pass in-process on {os.cpu_count()} torch threads. "
             f"Medians of {args.repeat} runs each, interleaved.", "",
             "| scene | windows | raw forward s | segment's inference s | beyond the windows s | raw / inference "
             "| segment's compute (ingest, inference, export) s |",
             "|---|---|---|---|---|---|---|"]
    for size, windows, raw, inference, total in rows:
        lines.append(f"| {size}² | {windows} | {raw:.3f} | {inference:.3f} | {inference - raw:.3f} | "
                     f"{raw / inference:.2f}× | {total:.2f} |")
    body = "\n".join(lines)
    report.publish(body, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
