"""Keep the largest connected components of a label map, out of core and exactly as MONAI does.

MONAI's ``KeepLargestConnectedComponent`` labels each applied label's
foreground (or their union) with ``skimage.measure.label``, ranks the
components by size and zeroes every voxel outside the largest
``num_components``.  Here the label map is a zarr array too large to load, so
the same result is computed in two passes over blocks of whole zarr chunks
(or shards).  Pass one labels each block on its own with
``scipy.ndimage.label`` (which is what skimage runs for a boolean image),
keeps per block-local component its size and the global flat index of its
first voxel, and joins components across block borders by pairing the two
voxel planes on either side of every border under the structuring element;
the joins form a graph whose connected components are the global
components.  Pass two relabels each block again (deterministically, so the
ids match) and zeroes the voxels of components that were not kept; every
task reads and writes only its own block, so the rewrite is safe in place.

Ties are resolved as MONAI resolves them: skimage numbers components in the
raster order of their first voxel, and MONAI keeps
``argsort(bincount)[::-1][:n]``; the global components are numbered in the
same order and the very same ``argsort`` is run on an identical counts array,
so whatever order numpy's sort gives equal sizes, the same ones are kept.

Memory: one block times a small factor per task, plus the border planes of
one slab of blocks (along axis 0) and a few numbers per block-local
component (its group, size, first voxel and keep flag) for the whole array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import dask
import numpy as np
import scipy.ndimage as ndi
import scipy.sparse
import scipy.sparse.csgraph
import zarr
from dask.delayed import delayed

from storage.errors import ConfigError, InvalidInputError, StoreError

Box = tuple[slice, ...]


@dataclass(frozen=True)
class _BlockStats:
    """What pass one keeps of a block: per local id (1..n) its group, size and first voxel, and its border planes."""

    n: int
    group: np.ndarray  # (n,) int32: index into the groups
    size: np.ndarray  # (n,) int64
    first: np.ndarray  # (n,) int64: global C-order flat index of the component's first voxel in the block
    lo: tuple[np.ndarray, ...]  # per axis: the block's first plane of ids (size 1 on that axis)
    hi: tuple[np.ndarray, ...]  # per axis: the block's last plane of ids


def structure_for(ndim: int, connectivity: int | None) -> np.ndarray:
    """The structuring element skimage uses: ``connectivity`` orthogonal hops, ``None`` meaning full (ndim)."""
    return ndi.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)


def _component_ids(block: np.ndarray, groups: Sequence[np.ndarray], structure: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Block-unique component ids (0 = not foreground) and each id's group.

    Groups hold disjoint label values, so their components never overlap and
    can share one id image; ids are numbered group by group, each group in
    scipy's (first-voxel) order.  Deterministic, so pass two recomputes it.
    """
    ids = np.zeros(block.shape, dtype=np.int32)
    owner: list[np.ndarray] = []
    offset = 0
    present = np.unique(block)
    for g, values in enumerate(groups):
        values = values[np.isin(values, present)]
        if values.size == 0:
            continue
        mask = block == values[0] if values.size == 1 else np.isin(block, values)
        lab, n = ndi.label(mask, structure=structure)
        if n == 0:
            continue
        if offset:
            np.add(lab, offset, out=lab, where=mask)
        ids += lab
        owner.append(np.full(n, g, dtype=np.int32))
        offset += n
    return ids, (np.concatenate(owner) if owner else np.zeros(0, dtype=np.int32))


def _read(labels: zarr.Array, box: Box) -> np.ndarray:
    return np.asarray(labels[box])


def _block_stats(labels: zarr.Array, box: Box, groups: Sequence[np.ndarray], structure: np.ndarray) -> _BlockStats:
    """Pass one on one block: local components, their sizes and first voxels, and the border planes."""
    ids, group = _component_ids(_read(labels, box), groups, structure)
    n = int(group.size)
    flat = ids.ravel()
    nz = np.flatnonzero(flat)
    uniq, first_pos, counts = np.unique(flat[nz], return_index=True, return_counts=True)
    assert uniq.size == n  # every id has at least one voxel
    # Local C order is monotone in global C order inside a box, so the first local voxel is the first global one.
    local = np.unravel_index(nz[first_pos], ids.shape)
    glob = tuple(c + s.start for c, s in zip(local, box))
    first = np.ravel_multi_index(glob, labels.shape).astype(np.int64) if n else np.zeros(0, np.int64)
    lo = tuple(np.ascontiguousarray(ids.take([0], axis=d)) for d in range(ids.ndim))
    hi = tuple(np.ascontiguousarray(ids.take([-1], axis=d)) for d in range(ids.ndim))
    return _BlockStats(n, group, counts.astype(np.int64), first, lo, hi)


def _rewrite_block(labels: zarr.Array, box: Box, groups: Sequence[np.ndarray], structure: np.ndarray,
                   keep: np.ndarray, name: str) -> dict[int, int]:
    """Pass two on one block: zero the voxels of components not kept; returns removed voxels per label value."""
    block = _read(labels, box)
    ids, group = _component_ids(block, groups, structure)
    if group.size + 1 != keep.size:
        raise StoreError(name, f"block {tuple((s.start, s.stop) for s in box)} changed while components were kept")
    remove = ~keep[ids]
    if not remove.any():
        return {}
    values, counts = np.unique(block[remove], return_counts=True)
    block[remove] = 0
    labels[box] = block
    return {int(v): int(c) for v, c in zip(values, counts)}


def _border_edges(a: np.ndarray, b: np.ndarray, axis: int, structure: np.ndarray,
                  node_group: np.ndarray) -> np.ndarray:
    """Pairs (2, m) of node ids adjacent across a border: ``a`` is the plane before it, ``b`` the one after.

    Every structuring-element offset that steps +1 across the border pairs
    a voxel of ``a`` with one of ``b``; only voxels of the same group join.
    """
    pairs = []
    centre = np.ones(structure.ndim, dtype=int)
    for off in np.argwhere(structure) - centre:
        if off[axis] != 1:
            continue
        sa, sb = [], []
        for e, o in enumerate(off):
            n = a.shape[e]
            if e == axis:
                sa.append(slice(None))
                sb.append(slice(None))
            else:
                sa.append(slice(max(0, -o), n - max(0, o)))
                sb.append(slice(max(0, o), n - max(0, -o)))
        x, y = a[tuple(sa)].ravel(), b[tuple(sb)].ravel()
        m = (x > 0) & (y > 0)
        x, y = x[m], y[m]
        m = node_group[x] == node_group[y]
        pairs.append(np.stack([x[m], y[m]]))
    if not pairs:
        return np.zeros((2, 0), dtype=np.int64)
    edges = np.concatenate(pairs, axis=1)
    return np.unique(edges, axis=1) if edges.shape[1] else edges


def _assemble(planes: dict[tuple[int, ...], np.ndarray], grid: tuple[int, ...], fixed: dict[int, int]) -> np.ndarray:
    """One border plane from the pieces of the blocks whose index is ``fixed`` on some axes."""
    shape = tuple(1 if d in fixed else n for d, n in enumerate(grid))
    cells = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        full = tuple(fixed.get(d, i) for d, i in enumerate(idx))
        cells[idx] = planes[full]
    return np.block(cells.tolist())


def _resolve_blocks(labels: zarr.Array, chunks: Sequence[int] | None, name: str) -> tuple[int, ...]:
    """Block shape: whole write units (shards, else chunks) so that concurrent in-place writes never share one."""
    unit = tuple(labels.shards or labels.chunks)
    if chunks is None:
        return unit
    block = tuple(int(c) for c in chunks)
    if len(block) != labels.ndim or any(c < 1 for c in block):
        raise ConfigError(name, f"chunks {tuple(chunks)} do not fit a {labels.ndim}-d array")
    if any(c % u and c < s for c, u, s in zip(block, unit, labels.shape)):
        raise ConfigError(name, f"chunks {block} are not multiples of the stored shards (else chunks) {unit}")
    return tuple(min(c, s) for c, s in zip(block, labels.shape))


def _validate(labels: zarr.Array, applied_labels: Sequence[int], connectivity: int | None,
              num_components: int, nodata_label: int | None, name: str) -> list[int]:
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(name, f"label map has dtype {labels.dtype}, not an integer label dtype")
    if labels.ndim < 1:
        raise InvalidInputError(name, "label map has no spatial axes")
    applied = list(dict.fromkeys(int(v) for v in applied_labels))  # MONAI repeats are idempotent
    if not applied:
        raise ConfigError(name, "applied_labels is empty")
    if 0 in applied:
        raise ConfigError(name, "applied_labels contains 0, the background that removed voxels become")
    info = np.iinfo(labels.dtype)
    if any(v < info.min or v > info.max for v in applied):
        raise ConfigError(name, f"applied_labels {applied} do not fit dtype {labels.dtype}")
    if nodata_label is not None and (nodata_label == 0 or nodata_label in applied):
        raise ConfigError(name, f"nodata label {nodata_label} cannot be 0 or one of applied_labels {applied}")
    if connectivity is not None and not 1 <= connectivity <= labels.ndim:
        raise ConfigError(name, f"connectivity {connectivity} is not in 1..{labels.ndim}")
    if num_components < 1:
        raise ConfigError(name, f"num_components {num_components} is below 1")
    return applied


def keep_largest_components(labels: zarr.Array, *, applied_labels: Sequence[int],
                            independent: bool = True, connectivity: int | None = None,
                            num_components: int = 1, nodata_label: int | None = None,
                            chunks: Sequence[int] | None = None) -> dict[str, Any]:
    """MONAI's ``KeepLargestConnectedComponent`` on a label map stored in zarr, rewritten in place.

    Same semantics as MONAI on a single-channel (not one-hot) label map:
    per applied label (``independent``) or for their union, voxels outside the
    ``num_components`` largest components become 0.  ``nodata_label`` voxels
    are never foreground and never written.  ``chunks`` is the processing
    block, whole stored chunks (shards); it does not change the result.
    Runs on whatever dask scheduler is current.

    Returns ``{"applied_labels", "independent", "connectivity", "num_components",
    "components", "removed_voxels"}``: ``components`` maps each label (or
    ``"union"``) to how many components it had, ``removed_voxels`` each
    label to the voxels zeroed.
    """
    name = str(labels.store_path)
    applied = _validate(labels, applied_labels, connectivity, num_components, nodata_label, name)
    ndim = labels.ndim
    conn = ndim if connectivity is None else int(connectivity)
    structure = structure_for(ndim, conn)
    dtype = labels.dtype
    groups = ([np.array([v], dtype=dtype) for v in applied] if independent
              else [np.array(applied, dtype=dtype)])
    block = _resolve_blocks(labels, chunks, name)
    grid = tuple(math.ceil(s / b) for s, b in zip(labels.shape, block))

    def box_of(idx: tuple[int, ...]) -> Box:
        return tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, block, labels.shape))

    # Pass one, slab by slab along axis 0: only one slab's border planes (and the previous slab's last) are held.
    base: dict[tuple[int, ...], int] = {}
    counts: dict[tuple[int, ...], int] = {}
    node_group = [np.array([-1], dtype=np.int32)]  # node 0: background
    node_size = [np.zeros(1, dtype=np.int64)]
    node_first = [np.zeros(1, dtype=np.int64)]
    total = 1
    edges: list[np.ndarray] = []
    prev_hi0: dict[tuple[int, ...], np.ndarray] = {}  # the previous slab's last planes along axis 0, local ids
    prev_groups = np.zeros(0, dtype=np.int32)
    for i in range(grid[0]):
        slab = [(i, *rest) for rest in np.ndindex(*grid[1:])]
        stats = dict(zip(slab, dask.compute(
            *[delayed(_block_stats)(labels, box_of(idx), groups, structure) for idx in slab])))
        start = total  # first node of this slab
        for idx, st in stats.items():
            base[idx], counts[idx] = total - 1, st.n  # local id k -> node base + k
            node_group.append(st.group)
            node_size.append(st.size)
            node_first.append(st.first)
            total += st.n
        # Border planes hold nodes of this slab and the previous one: a contiguous window of node ids,
        # numbered from 1 in the planes (0 stays background), so the group lookup is window-sized.
        cur_groups = np.concatenate([st.group for st in stats.values()])
        lookup = np.concatenate([[-1], prev_groups, cur_groups]).astype(np.int32)
        shift = start - prev_groups.size - 1  # window id + shift = global node id

        def win(idx: tuple[int, ...], plane: np.ndarray) -> np.ndarray:
            return np.where(plane > 0, plane.astype(np.int64) + (base[idx] - shift), 0)

        def join(a: np.ndarray, b: np.ndarray, axis: int) -> None:
            e = _border_edges(a, b, axis, structure, lookup)
            edges.append(e + shift)

        if i > 0:  # the border between the previous slab and this one, across the whole plane
            join(_assemble({k: win(k, v) for k, v in prev_hi0.items()}, grid, {0: i - 1}),
                 _assemble({k: win(k, st.lo[0]) for k, st in stats.items()}, grid, {0: i}), 0)
        for d in range(1, ndim):  # borders inside the slab
            for j in range(1, grid[d]):
                join(_assemble({k: win(k, st.hi[d]) for k, st in stats.items() if k[d] == j - 1},
                               grid, {0: i, d: j - 1}),
                     _assemble({k: win(k, st.lo[d]) for k, st in stats.items() if k[d] == j},
                               grid, {0: i, d: j}), d)
        prev_hi0 = {k: st.hi[0] for k, st in stats.items()}
        prev_groups = cur_groups
        del stats

    # Global components: connected components of the block-local components joined across borders.
    group_of, size_of, first_of = (np.concatenate(x) for x in (node_group, node_size, node_first))
    pairs = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), dtype=np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(pairs.shape[1], dtype=np.int8), (pairs[0], pairs[1])),
                                    shape=(total, total)).tocsr()
    ncomp, comp = scipy.sparse.csgraph.connected_components(graph, directed=False)
    comp_size = np.zeros(ncomp, dtype=np.int64)
    np.add.at(comp_size, comp, size_of)
    comp_first = np.full(ncomp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(comp_first, comp, first_of)
    comp_group = np.full(ncomp, -1, dtype=np.int32)
    comp_group[comp] = group_of

    keep_comp = np.zeros(ncomp, dtype=bool)
    found: dict[Any, int] = {}
    for g in range(len(groups)):
        sel = np.flatnonzero(comp_group == g)
        order = sel[np.argsort(comp_first[sel], kind="stable")]  # skimage's numbering: first voxel in C order
        found[applied[g] if independent else "union"] = int(order.size)
        if order.size <= num_components:
            keep_comp[order] = True
            continue
        ranked = np.zeros(order.size + 1, dtype=np.intp)  # MONAI: bincount(features), counts[0] = 0
        ranked[1:] = comp_size[order]
        top = np.argsort(ranked)[::-1][:num_components]
        keep_comp[order[top - 1]] = True
    keep_node = keep_comp[comp]

    # Pass two: every block rewrites itself, only where something is removed.
    tasks = []
    for idx in np.ndindex(*grid):
        lut = keep_node[base[idx]: base[idx] + counts[idx] + 1].copy()
        lut[0] = True  # id 0 is not foreground: untouched (background, other labels, nodata)
        if not lut.all():
            tasks.append(delayed(_rewrite_block)(labels, box_of(idx), groups, structure, lut, name))
    removed = {v: 0 for v in applied}
    for part in dask.compute(*tasks):
        for v, c in part.items():
            removed[v] = removed.get(v, 0) + c
    return {
        "applied_labels": applied,
        "independent": bool(independent),
        "connectivity": conn,
        "num_components": int(num_components),
        "components": found,
        "removed_voxels": removed,
    }


__all__ = ["keep_largest_components", "structure_for"]
