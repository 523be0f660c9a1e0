"""Where an evaluate task gets its input region from: a stored array, or a dask image computed in the task.

Stitching (:mod:`segmentation.stitching`) hands each evaluate task the region
its windows cover. Given the image's chunks as separate graph tasks, a
scheduler loads them as soon as they are ready, which is at once, far ahead
of the windows that need them, and memory grows with the image. So an
evaluate task reads its region itself: from a stored array
(:class:`RegionReader`), or by computing a dask image's graph culled to the
region (:class:`ComputedRegion`). Nothing of the image then exists outside a
running task, and the values are the same.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Mapping

import dask.array as da
import numpy as np

from storage.chunkcache import CachedChunks

__all__ = ["Box", "RegionReader", "ComputedRegion"]

Box = tuple[tuple[int, int], ...]  # per spatial axis [lo, hi)


class RegionReader:
    """A stored (C, *spatial) image an evaluate task reads its own region from.

    Given image chunks as separate tasks, a scheduler may load them well
    ahead of the windows that need them (it did, once the writes came to wait
    on a model-space way back: 72 chunks held at 16384², 7 at 8192²); read in
    the task itself, a chunk exists only while its windows run.  The values
    are the stored ones either way.
    """

    def __init__(self, array: Any, cached: CachedChunks | None = None) -> None:
        """``cached``: the same array read through this process's decoded chunks (:mod:`storage.chunkcache`)."""
        self.array = array
        self.cached = cached

    def read(self, region: Box) -> np.ndarray:
        if self.cached is not None:
            return self.cached.read(((0, self.array.shape[0]),) + tuple(region))  # every channel
        return np.asarray(self.array[(slice(None),) + tuple(slice(lo, hi) for lo, hi in region)])


class ComputedRegion:
    """One evaluate task's region of a dask image, computed by the task itself.

    As image chunks are ready as soon as the run starts (they depend on
    nothing the stitch makes), a scheduler loaded them far ahead of the
    windows that need them: with the API's ``predict(da.from_zarr(z) / 255,
    ...)`` on dask's threaded scheduler, 55 float32 chunks (692 MB) and the
    pieces of the evaluates they let run ahead (659 MB) at 16384², a third of
    that at 8192².  Here each evaluate task computes its region, with the
    image's graph culled to it (only that is shipped with the task), on the
    synchronous scheduler inside the task: nothing of the image exists
    outside a running task.  The values are the same.  The price: the chunk
    work under the region's far edges is done again by the neighbouring owner
    (elementwise steps are sliced first, so 34 ms for a 1280² region of
    ``from_zarr(...).astype(float32) / 255`` against 20 ms per 1024² chunk);
    an expensive per-chunk graph is better stored or persisted first.
    """

    def __init__(self, image: da.Array, region: Box, tasks: Mapping[Any, Any] | None = None) -> None:
        """``tasks``: the image's graph as a dict, made once for all owners (cull only visits what the region
        needs; copying the whole graph per owner would grow with the square of the chunk count)."""
        from dask.core import flatten
        from dask.optimization import cull

        sub = image[(slice(None),) + tuple(slice(lo, hi) for lo, hi in region)]
        tasks = dict(image.__dask_graph__()) if tasks is None else tasks
        graph, _ = cull(ChainMap(dict(sub.__dask_graph__().layers[sub.name]), tasks),
                        list(flatten(sub.__dask_keys__())))
        self.array = da.Array(graph, sub.name, sub.chunks, meta=sub._meta)
        self.region = region

    def read(self, region: Box) -> np.ndarray:
        assert tuple(region) == tuple(self.region), (region, self.region)
        return np.asarray(self.array.compute(scheduler="sync"))
