"""Chunks finalised in index order, whatever their number, under dask's own ordering.

``dask.order`` ranks like tasks by their counts of dependencies, and breaks the
remaining ties by their keys' strings, in which block 9 sorts after block 15.
Past ten chunks along an axis it so runs the owners of rows 9 to 2, then 15 to
10, then 1 and 0: row 9's chunks need row 10's owners, whose own chunks then
wait for row 11, a whole sweep later, holding their regions' sums (at 16384²
in the API, 20 regions, 0.36 GB; docs/performance.md, "Why it grew").

So each chunk's final task (its probabilities or labels) also takes a *rank
token* of its slice along the axis with the most chunks.  The tokens form a
chain, token k depending on token k - 1, so a final task of slice k has k more
dependencies than one of slice 0, and dask's tie-break by dependency count
puts the slices in order before any key string is compared.  A token is None
and costs one trivial task per slice; the values computed do not change.

Only for dask's local schedulers (threads, synchronous), which run a graph in
``dask.order``'s order.  The distributed scheduler takes root tasks by its own
queueing rules: there `segflow segment` at 32768² did not need the tokens and
peaked about 0.1 GB higher with them (1.42-1.45 GB in four runs against 1.30-1.39 GB
in five), so a graph built while a distributed client is current goes without.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from dask.delayed import Delayed, delayed

# past this many chunks along an axis, dask's tie-break by key string puts chunk 10 before chunk 9
STRING_ORDERED = 10


def _token(previous: Any) -> None:
    return None


def local_scheduler() -> bool:
    """Whether a graph built now will run on dask's local schedulers: no distributed client is current."""
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return True
    return False


def rank_tokens(name: str, chunk_grid: Sequence[int]) -> tuple[int, list[Delayed]] | None:
    """(axis, one token per chunk slice along it) for the axis with the most chunks, or None where every axis
    has at most :data:`STRING_ORDERED` chunks (the string order is then the index order, and the graph stays
    as it was) or a distributed client is current (:func:`local_scheduler`)."""
    if not chunk_grid or max(chunk_grid) <= STRING_ORDERED or not local_scheduler():
        return None
    axis = max(range(len(chunk_grid)), key=lambda a: chunk_grid[a])
    tokens: list[Delayed] = []
    for k in range(chunk_grid[axis]):
        tokens.append(delayed(_token, pure=True)(tokens[-1] if tokens else None,
                                                 dask_key_name=f"segflow_rank-{name}-{k}"))
    return axis, tokens


def after(rank: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``: ``rank`` is there only as a dependency (:func:`rank_tokens`)."""
    return fn(*args)


def final_task(ranks: tuple[int, list[Delayed]] | None, index: Sequence[int], fn: Callable[..., Any], *args: Any,
               key: Any) -> Delayed:
    """The delayed ``fn(*args)`` keyed ``key``, ranked by its chunk ``index`` where ``ranks`` are given."""
    if ranks is None:
        return delayed(fn, pure=True)(*args, dask_key_name=key)
    axis, tokens = ranks
    return delayed(after, pure=True)(tokens[index[axis]], fn, *args, dask_key_name=key)


__all__ = ["STRING_ORDERED", "after", "final_task", "local_scheduler", "rank_tokens"]
