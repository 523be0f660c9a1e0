"""What the Dask scheduler holds in memory when a raster model-space run's worker peaks.

    .venv/bin/python benchmarks/warp_held.py SIZE WORKDIR

A diagnostic, not a timing: ``benchmarks/warp.py``'s scene (SIZE² at 5 m) and
cheap 10 m model are segmented by ``flows.pipeline.segment_one`` on a local
cluster of one worker process with 2 threads, while a thread samples the
worker's memory every 0.5 s; at the highest sample it asks the scheduler how
many tasks of each key prefix are in memory, and their bytes.  The sampling
slows the run down (the scheduler walks every task), so its seconds mean
nothing; the held tasks say what grows with the scene.
"""
from __future__ import annotations

import collections
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def held(dask_scheduler) -> dict[str, tuple[int, int]]:  # noqa: ANN001 - runs on the scheduler
    """Key prefix -> (tasks in memory, their MB)."""
    count: collections.Counter = collections.Counter()
    size: collections.Counter = collections.Counter()
    for ts in dask_scheduler.tasks.values():
        if ts.state == "memory":
            count[ts.prefix.name] += 1
            size[ts.prefix.name] += ts.nbytes
    return {k: (count[k], round(size[k] / 1e6)) for k in count}


def main() -> int:
    size, work = int(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    import warp

    from distributed import Client, LocalCluster

    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from segmentation import load_model

    scene, model = work / f"scene{size}.tif", work / "cheap"
    if not scene.exists():
        warp.make_scene(scene, size)
    if not model.exists():
        warp.make_model(model, "cheap")
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None)
    client = Client(cluster)
    peak: dict = {"mb": 0.0, "held": {}}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            workers = client.scheduler_info()["workers"].values()
            mb = sum(w["metrics"]["memory"] for w in workers) / 1e6
            if mb > peak["mb"]:
                peak["mb"], peak["held"] = mb, client.run_on_scheduler(held)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = work / f"out{size}"
    shutil.rmtree(out, ignore_errors=True)
    segment_one(scene, load_model(str(model)), out, SegmentOptions(precision="fast", chunk_size=1024,
                                                                   keep_zarr=False), client)
    done.set()
    sampler.join()
    print(f"{size}²: worker peak {peak['mb']:.0f} MB; in memory then (prefix: tasks, MB):")
    for prefix, (n, mb) in sorted(peak["held"].items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  {prefix}: {n}, {mb}")
    client.close()
    cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
