"""What warping costs in raster model space: a 5 m scene segmented by a 10 m model (warped there and back), against
the sliding window alone on the same model-space image.

    .venv/bin/python benchmarks/warp.py [--sizes 8192 16384] [--models cheap demo standard trained trained-standard]
                                        [--demo-sizes 8192] [--trained DIR] [--trained-standard DIR]
                                        [--chunk 1024] [--repeat 3] [--record warp]

For each size a 4-band uint16 scene at 5 m (EPSG:32633) is generated block by
block into a tiled GeoTIFF (smooth fields of land-cover-like patches plus
noise, never whole in memory).  The model directory holds a random-weight 2-D
U-Net whose version-4 card declares a 10 m ground sample distance: ``cheap``
(the warp's worst case, a sliding window as cheap as it gets), ``demo`` (the
demo land-cover card's network) or ``standard`` (a U-Net of the size people
train for land cover, five levels from 32 to 512 channels: the same warp
against a heavier forward pass).  ``segflow
segment`` stitches on the 10 m grid, the window tasks warping the model chunks
they read from the 5 m store, each chunk once (``average``, the separable fast path of
:mod:`storage.separable`, equal to GDAL's; no model-space store), and brings
the labels back onto the 5 m grid (the argmax on the model grid, bilinear
probabilities near label boundaries only) (run A).  Run B is
the sliding window alone: the same model-space image, as
``storage.warp.to_model`` computes it, written as a float32 GeoTIFF on the
10 m grid, which segflow segments without any warp (its statistics must say
so).  Both run as ``segflow segment`` subprocesses with the same model, chunk
size and precision; the RSS of each whole process tree is sampled every 0.2 s
(``benchmarks/memory.py``'s ``run_sampled``).

Run C is run A with ``--output-grid model``: the same warp in, the labels left
on the 10 m grid, so C - B is the way in alone and A - C the way back with
the labels on the 4x finer input grid.

Warping cost = ``inference_seconds`` of A minus B's, as a fraction of B's (the
forward pass, stitching and writing included in both): the warp inside the
windows' reads (the 5 m uint16 region read and averaged, against B's float32
10 m region), the way back, the argmax and the label chunks written on the 4x
larger input grid.  A's ``model_image_seconds`` is what runs before the
windows: the model grid's valid mask (nothing at all when every model pixel
falls on a valid input pixel, as here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from memory import run_sampled  # noqa: E402  (the memory benchmark's process-tree RSS sampling)

INPUT_M, MODEL_M = 5.0, 10.0
CLASSES = 4
EPSG = 32633
TILE = 2048  # generated once, then shifted per block: generation stays fast
RUNS = {"B": "B: sliding window alone", "C": "C: model space, labels left on the model grid",
        "A": "A: model space and back"}


def _pattern(seed: int = 0) -> np.ndarray:
    """(4, TILE, TILE) uint16: smooth patches (reflectance x 10000-like per band) with texture and noise."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.random((TILE, TILE)), 24, mode="wrap")
    classes = np.digitize(field, np.quantile(field, [0.25, 0.5, 0.75]))
    base = np.array([[400, 900, 600, 1500], [700, 850, 500, 3500], [900, 1100, 1200, 2800], [1300, 1300, 1400, 1800]],
                    dtype=np.float32)  # water, forest, crops, built-up per band
    texture = gaussian_filter(rng.normal(size=(TILE, TILE)), 2, mode="wrap").astype(np.float32)
    bands = base[classes].transpose(2, 0, 1) * (1 + 0.15 * texture) + rng.normal(0, 30, (4, TILE, TILE))
    return np.clip(bands, 1, 10000).astype(np.uint16)


def _demo_pattern(seed: int = 11) -> np.ndarray:
    """(4, TILE, TILE) uint16 at 5 m whose 10 m average is exactly a demo scene (storage.samples, unseen seed): the
    demo's trained model then sees its own kind of image in model space and gives coherent labels."""
    from storage import samples

    with tempfile.TemporaryDirectory() as tmp:
        image, _ = samples.make_scene(Path(tmp) / "tile.tif", size=(TILE // 2, TILE // 2), seed=seed,
                                      nodata_margin=0)
        import rasterio

        with rasterio.open(image) as src:
            ten = src.read()
    return np.maximum(ten, 1).repeat(2, axis=1).repeat(2, axis=2)


def make_scene(path: Path, size: int, kind: str = "cheap") -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    demo = kind.startswith("trained")
    tile = _demo_pattern() if demo else _pattern()
    step = (516, 312) if demo else (517, 311)  # even shifts keep the trained scene's 2×2 cells whole
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype="uint16",
                       crs=f"EPSG:{EPSG}", transform=from_origin(400000, 5900000, INPUT_M, INPUT_M), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="YES") as dst:
        for y in range(0, size, TILE):
            for x in range(0, size, TILE):
                block = np.roll(tile, ((x + 3 * y) // TILE * step[0], (y + x) // TILE * step[1]), axis=(1, 2))
                dst.write(block[:, :min(TILE, size - y), :min(TILE, size - x)],
                          window=Window(x, y, min(TILE, size - x), min(TILE, size - y)))


def make_model(path: Path, kind: str = "cheap", trained: Path | None = None) -> str:
    """A 2-D U-Net whose version-4 card asks for 10 m; returns its description for the notes.

    ``cheap``: channels (8, 16, 32), ROI 256², no residual units (the warp's
    worst case: the sliding window is as cheap as it gets).  ``demo``: the
    demo land-cover card's network (segmentation/demo_cards.py: channels
    (16, 32, 64, 128), one residual unit, batch norm, ROI 128²), a realistic
    cost per pixel, with this benchmark's 4 classes and scaling.  ``trained``:
    the demo's trained land-cover model (``trained``, a demo run's
    ``models/landcover-2d``, or trained here as ``segflow demo`` does, about
    3 minutes), whose labels are coherent like a real model's.  ``trained-standard``: the ``standard`` network
    trained on the demo's scenes with the demo's land-cover budget (``trained``, a directory this benchmark
    made before, or trained here, about 3 minutes on 2 cores): the warp beside the forward pass of a network of the size
    people train, with coherent labels (``standard``'s random weights label salt and pepper, the way back's
    worst case).
    """
    import torch

    if kind == "trained":
        return _trained_model(path, trained)
    if kind == "trained-standard":
        return _trained_model(path, trained, standard=True)

    from segmentation.card import ModelCard
    from segmentation.modeldir import build_module, save_model

    if kind == "demo":
        from segmentation.demo_cards import landcover_card

        demo = landcover_card()
        arch, roi = demo.architecture.kwargs, list(demo.inference.roi)
        text = "the demo card's U-Net (16, 32, 64, 128; 1 residual unit; batch norm), ROI 128²"
    elif kind == "standard":
        arch, roi = STANDARD, [256, 256]
        text = "a standard-size U-Net (32, 64, 128, 256, 512; 2 residual units; batch norm), ROI 256²"
    else:
        arch, roi = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0}, [256, 256]
        text = "a cheap U-Net (8, 16, 32), ROI 256²"
    card = ModelCard.model_validate({
        "name": f"warp-bench-{kind}", "architecture": {"name": "unet", "kwargs": arch},
        "input": {"spatial_dims": 2, "channels": 4, "spacing": [MODEL_M, MODEL_M], "spacing_unit": "m",
                  "normalization": {"mode": "scale", "scale": [1e-4] * 4}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(CLASSES)],
        "inference": {"roi": roi, "overlap": 0.25, "batch_size": 8}})
    torch.manual_seed(0)
    save_model(path, card, build_module(card))
    return text


STANDARD = {"channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}


def _trained_model(path: Path, trained: Path | None, standard: bool = False) -> str:
    text = ("a standard-size U-Net (32, 64, 128, 256, 512; 2 residual units; batch norm), ROI 256², 5 classes, "
            "trained on the demo's land-cover scenes" if standard else
            "the demo's trained land-cover U-Net (16, 32, 64, 128; 1 residual unit; batch norm), ROI 128², 5 classes")
    if trained is not None:
        shutil.copytree(trained, path)
        return text + (f" ({trained})" if standard else f" (trained by `segflow demo`, {trained.name})")
    from flows.training import train_from_files
    from segmentation.card import Architecture
    from segmentation.demo_cards import DEMO_BUDGET, landcover_card
    from storage import samples

    card = landcover_card()
    budget = DEMO_BUDGET[card.name]
    if standard:
        card = card.model_copy(update={
            "name": "landcover-2d-standard", "architecture": Architecture(name="unet", kwargs=STANDARD),
            "inference": card.inference.model_copy(update={"roi": [256, 256]})})
    pairs = [samples.make_scene(path.parent / f"train-{s}.tif", seed=s) for s in (1, 2, 3)]
    t = time.perf_counter()
    train_from_files(card, pairs, path, steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr,
                     patch=budget.patch)
    print(f"# trained {card.name} in {time.perf_counter() - t:.0f} s (kept in {path})", flush=True)
    return text + " (trained here with the demo's budget)"


def make_model_space_scene(scene: Path, out: Path, work: Path, chunk: int) -> dict:
    """The scene as ``storage.warp.to_model`` puts it on the 10 m grid, written as a float32 GeoTIFF there,
    one row of model chunks at a time (out of core).  Returns the mapping and the forward warp's seconds."""
    import dask
    import dask.array as da
    import rasterio
    from rasterio.windows import Window

    from storage.ingest import ingest
    from storage.rastergrid import raster_mapping
    from storage.warp import to_model

    store = ingest(scene, work / "scene.image.zarr", chunk=chunk)
    mapping = raster_mapping(store.meta.geometry, store.spatial_shape, spacing=[MODEL_M, MODEL_M], crs=None)
    valid = None if store.mask is None else da.from_zarr(store.mask)
    moved, _ = to_model(da.from_zarr(store.image), mapping, chunks=chunk, valid=valid)
    seconds = 0.0
    h, w = mapping.model_shape
    with rasterio.open(out, "w", driver="GTiff", width=w, height=h, count=4, dtype="float32", crs=f"EPSG:{EPSG}",
                       transform=mapping.model.affine, tiled=True, blockxsize=512, blockysize=512,
                       BIGTIFF="YES") as dst:
        for y in range(0, h, chunk):
            t = time.perf_counter()
            with dask.config.set(scheduler="threads", num_workers=2):
                rows = moved[:, y:y + chunk].compute()
            seconds += time.perf_counter() - t
            dst.write(rows, window=Window(0, y, w, rows.shape[1]))
    shutil.rmtree(store.path)
    return {"mapping": mapping, "forward_seconds": seconds}


def segment(scene: Path, model: Path, out: Path, chunk: int, extra: Sequence[str] = ()) -> dict:
    """One ``segflow segment`` subprocess: wall seconds, peak tree RSS, and its provenance statistics."""
    from storage.provenance import sidecar_path

    cmd = [sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model), "--out", str(out),
           "--precision", "fast", "--chunk-size", str(chunk), "--no-zarr", *extra]
    rc, text, wall, peak, at_peak = run_sampled(cmd)
    if rc != 0:
        raise SystemExit(f"segflow failed on {scene.name}:\n{text}")
    record = json.loads(sidecar_path(out / scene.name).read_text())
    return {"wall_s": wall, "peak_gb": peak / 1e9, "roles": {k: round(v / 1e9, 2) for k, v in at_peak.items()},
            "stats": record["statistics"]}


def bench(kind: str, sizes: list[int], chunk: int, tmp: Path,
          trained: Path | None = None, repeat: int = 1) -> tuple[list[str], list[str]]:
    """Runs B, C and A per size with one model, ``repeat`` interleaved rounds; (table lines, summary notes).

    With repeats, each row is the round whose cost (A - B) is the median of
    the rounds, and the costs' ranges are given: on a noisy machine one round
    can be off by a third."""
    head = ["| scene (5 m) | model grid (10 m) | run | windows | inference s | of which before the windows s | ingest s "
            "| export s | wall s | peak RSS GB (largest process of each kind) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    print(f"## model: {kind}", flush=True)
    print("\n".join(head), flush=True)
    rows, summary, peaks = [], [], {}
    model = tmp / f"model-{kind}"
    text = make_model(model, kind, trained)
    for size in sizes:
        d = tmp / f"s{size}"
        (d / "b").mkdir(parents=True)
        scene = d / "scene.tif"
        t = time.perf_counter()
        make_scene(scene, size, kind)
        gen = time.perf_counter() - t
        made = make_model_space_scene(scene, d / "b" / "scene.tif", d, chunk)
        mapping = made["mapping"]
        print(f"# {size}²: generated in {gen:.0f} s; model grid {mapping.model_shape}, warp to the model alone "
              f"{made['forward_seconds']:.1f} s (2 threads, in-process)", flush=True)
        pairs = []
        for rep in range(repeat):
            pair = {}
            for run, path in (("B", d / "b" / "scene.tif"), ("C", scene), ("A", scene)):
                r = segment(path, model, d / f"out-{run}", chunk, ["--output-grid", "model"] if run == "C" else [])
                s = r["stats"]
                if (run != "B") != ("model_space" in s):
                    raise SystemExit(f"run {run}: model space {'applied' if run == 'B' else 'missing'}")
                roles = ", ".join(f"{k} {v}" for k, v in sorted(r["roles"].items()))
                r["row"] = (f"| {size}² | {'×'.join(map(str, mapping.model_shape))} | "
                            f"{RUNS[run]} | "
                            f"{s.get('windows_total')} | {s['inference_seconds']:.1f} | "
                            f"{s.get('model_image_seconds', 0):.1f} | {s['ingest_seconds']:.1f} | "
                            f"{s['export_seconds']:.1f} | {r['wall_s']:.0f} | {r['peak_gb']:.2f} ({roles}) |")
                print(r["row"] + (f" (round {rep + 1} of {repeat})" if repeat > 1 else ""), flush=True)
                pair[run] = r
                shutil.rmtree(d / f"out-{run}")
            pairs.append(pair)
        costs = [p["A"]["stats"]["inference_seconds"] - p["B"]["stats"]["inference_seconds"] for p in pairs]
        fractions = [c / p["B"]["stats"]["inference_seconds"] for c, p in zip(costs, pairs)]
        pair = pairs[sorted(range(len(pairs)), key=lambda i: fractions[i])[len(pairs) // 2]]  # the median pair
        for run in ("B", "C", "A"):
            rows.append(pair[run]["row"])
            peaks[(size, run)] = (max(p[run]["peak_gb"] for p in pairs),
                                  max(p[run]["roles"].get("dask worker", 0.0) for p in pairs))
        a, b = pair["A"]["stats"], pair["B"]["stats"]
        cost = a["inference_seconds"] - b["inference_seconds"]
        ways_in = [p["C"]["stats"]["inference_seconds"] / p["B"]["stats"]["inference_seconds"] - 1 for p in pairs]
        summary.append({"size": size, "cost": cost, "forward": a["model_image_seconds"],
                        "way_in": pair["C"]["stats"]["inference_seconds"] - b["inference_seconds"],
                        "way_in_range": (min(ways_in), max(ways_in)),
                        "b": b["inference_seconds"], "fraction": cost / b["inference_seconds"],
                        "range": (min(fractions), max(fractions)), "pairs": len(pairs),
                        "wall": pair["A"]["wall_s"] - pair["B"]["wall_s"], "alone": made["forward_seconds"]})
        shutil.rmtree(d)
    lines = [f"**Model: {text}.**", "", *head, *rows, "",
             "| scene | warping = inference A − B (s) | before the windows (mask) s | the way in: C − B (s) "
             "| the way back and the finer labels: A − C (s) | B inference s | way in / B | warping / B "
             "| end to end A − B (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in summary:
        spread = "" if m["pairs"] == 1 else \
            f" (rounds: {100 * m['range'][0]:.0f}–{100 * m['range'][1]:.0f} %)"
        spread_in = "" if m["pairs"] == 1 else \
            f" (rounds: {100 * m['way_in_range'][0]:.0f}–{100 * m['way_in_range'][1]:.0f} %)"
        lines.append(f"| {m['size']}² | {m['cost']:.1f} | {m['forward']:.1f} | {m['way_in']:.1f} | "
                     f"{m['cost'] - m['way_in']:.1f} | {m['b']:.1f} | {100 * m['way_in'] / m['b']:.0f} %{spread_in} "
                     f"| **{100 * m['fraction']:.0f} %**{spread} | {m['wall']:.0f} |")
    notes = []
    for m in summary:
        verdict = "met" if m["fraction"] <= 0.15 else f"missed by {100 * (m['fraction'] - 0.15):.0f} points"
        spread = "" if m["pairs"] == 1 else \
            f", median of {m['pairs']} rounds ranging {100 * m['range'][0]:.0f}–{100 * m['range'][1]:.0f} %"
        notes.append(f"- {kind}, {m['size']}²: warping there and back costs **{100 * m['fraction']:.0f} %** of the "
                     f"sliding window alone{spread} (goal ≤ 15 %: {verdict}); the way in alone (labels left on the "
                     f"model grid, run C) {100 * m['way_in'] / m['b']:.0f} %, the way back and the labels on the 4× "
                     f"finer grid {100 * (m['cost'] - m['way_in']) / m['b']:.0f} %; {m['forward']:.1f} s before the "
                     f"windows (the warp to the model alone, in-process: {m['alone']:.1f} s).")
    done = sorted({s for s, _ in peaks})
    if len(done) > 1:
        lo, hi = done[0], done[-1]
        for run in ("A", "C", "B"):
            (p_lo, w_lo), (p_hi, w_hi) = peaks[(lo, run)], peaks[(hi, run)]
            workers = f"; dask worker {w_lo:.2f} -> {w_hi:.2f} GB" if w_hi else ", one process"
            notes.append(f"- {kind}, peak RSS (the largest of its runs), run {run}: {p_lo:.2f} GB at {lo}², "
                         f"{p_hi:.2f} GB at {hi}² "
                         f"({(hi / lo) ** 2:.0f}× the pixels, {p_hi / p_lo:.2f}× the memory{workers}).")
    return lines, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384], help="scene sizes (pixels at 5 m)")
    ap.add_argument("--models", nargs="+", choices=["cheap", "demo", "standard", "trained", "trained-standard"],
                    default=["cheap"],
                    help="cheap: the warp's worst case; demo: the demo card's U-Net; standard: a 5-level U-Net "
                         "(32-512 channels), the size people train; trained: the demo's trained model on "
                         "demo-like scenes (coherent labels); trained-standard: the standard U-Net trained on "
                         "the demo's scenes")
    ap.add_argument("--trained", type=Path, default=None,
                    help="the trained model directory (a demo run's models/landcover-2d); default: train one")
    ap.add_argument("--trained-standard", type=Path, default=None,
                    help="a trained-standard model directory this benchmark trained before (--keep); default: "
                         "train one")
    ap.add_argument("--demo-sizes", type=int, nargs="+", default=None,
                    help="sizes for the demo and standard models (default: --sizes)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1,
                    help="B/C/A rounds per size, interleaved; the median round (by A's cost) is shown, with the "
                         "ranges of the costs")
    ap.add_argument("--keep", type=Path, default=None, help="work here (default: a temporary folder)")
    report.add_argument(ap)
    args = ap.parse_args()
    body, notes = [], []
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp_name:
        for kind in args.models:
            sizes = args.demo_sizes if kind in ("demo", "standard") and args.demo_sizes else args.sizes
            trained = args.trained_standard if kind == "trained-standard" else args.trained
            lines, found = bench(kind, sizes, args.chunk, Path(tmp_name), trained, args.repeat)
            body += [*lines, ""]
            notes += found
    intro = (f"4-band uint16 scene at {INPUT_M:g} m (EPSG:{EPSG}): for `cheap`, `demo` and `standard` smooth "
             "patches with "
             f"texture and noise and random-weight U-Nets with {CLASSES} classes; for `trained` and "
             "`trained-standard` a demo scene (unseen seed) repeated 2×2 per pixel, so its 10 m average is exactly a "
             "demo scene, and the demo's trained model or the standard U-Net trained on the demo's scenes "
             f"(5 classes); card version 4 at {MODEL_M:g} m, overlap 0.25, batch 8, "
             f"chunks {args.chunk}², `segflow segment --precision fast --no-zarr` (labels only) with segflow's "
             "default cluster. Run A stitches on the 10 m grid, the window tasks warping the model chunks they read "
             "from the 5 m scene (average), each once, and brings the labels back (bilinear probabilities near label "
             "boundaries only); run B segments the same 10 m "
             "model-space image written as a GeoTIFF, which segflow does not warp (checked). Run C is A with "
             "`--output-grid model`: warped in the same way, labels left on the 10 m grid (no way back). Seconds "
             "are the provenance statistics; RSS is sampled every 0.2 s over the whole process tree."
             + (f" Each size ran {args.repeat} B/C/A rounds, one after the other; the rows are the round with the "
                "median cost of A, the costs' ranges over the rounds in brackets." if args.repeat > 1 else ""))
    text = "\n".join([intro, "", *body, *notes])
    print("\n".join(notes))
    if args.record:
        report.record(args.record, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
