"""An image's highest patch distance without every patch's full search: the worker's path for frames whose maps
are not drawn (PatchCoreScorer.score with `grids_over`).

A frame's score needs only its highest patch distance (then Eq. 7 for that one patch); its other patches matter
only when a map is drawn, i.e. for the frames found anomalous. Every patch first gets a cheap shortlist
(`ShortlistIndex.upper_bounds`): an ivf of its own over the bank's first 32 principal coordinates (a quarter of
the full search's 128-dimensional projection), `BOUND_PROBES` cells visited, `BOUND_CANDIDATES` candidates
re-ranked exactly, so each value is a true distance to a bank feature and hence never below what the full search
can report for it (an upper bound). The `SEED_PATCHES` patches of each window with the highest upper bounds then
get the full search; the highest of their distances, `floor`, is a true patch distance of the window, so the
window's maximum is at least `floor`. A patch whose upper bound lies under `floor` cannot be the maximum; every
other patch gets the full search too. The maximum over the patches searched in full is then the window's
maximum, and its patch and nearest bank feature are those Eq. 7 needs.

What a patch searched in full reports: the nearer of its two shortlists' best (cheap and full). That is the full
search's distance except where the cheap shortlist holds a nearer bank feature than the full one (the full
shortlist keeps the 8 nearest of 16 cells in the projected space; a feature of the cheap cells can fall out of it
and still be nearer in all dimensions): then nearer to the exact search's. Measured: 7 of the 80,752 completed
patches of bottle's and macaroni1's test sets, and every score of both test sets equal to the full search's
(docs/scorer.md, *The bounded image score*). The maps of the frames found anomalous are completed the same way
(`complete`), so a frame's score and map come from the same distances.

Speed: on the synthetic line's frames (mobilenet_v2 bank of 4,704 features, batches of 8) 0.3 % of the patches
needed the full search beyond the seeds; the cheap shortlist took 14 ms per batch where the 128-dimensional one
(2 of the full search's own cells, 8 candidates) took 24 and the full search 45 (`/tmp` timing, 2-core AMD EPYC,
quiet): bench/bounded.py, bench/scorer_alone.py and bench/worker_speed.py measure it end to end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .index import ShortlistIndex

BOUND_PROBES = 2  # cells of the cheap shortlist visited per patch (1: 2.6 % of the patches then needed the full search
#                  beyond the seeds; 2: 0.3 %; /tmp timing on the synthetic line)
BOUND_CANDIDATES = 4  # of which re-ranked exactly (1: 1.2 % then needed it; 4 and 8: 0.3 %)
SEED_PATCHES = 8  # patches per window searched in full first (4: 3.1 % then needed it; 8: 0.4 %)


def supports(index) -> bool:
    """Whether `index` has the cheap shortlist this path starts from (the ivf search; not exact, half, hnsw)."""
    return isinstance(index, ShortlistIndex) and index.search_config.method == "ivf"


@dataclass
class BoundedDistances:
    """Patch distances of c windows, searched in full only where it can matter for each window's maximum."""

    distances: torch.Tensor  # [c, L] searched in full where `full`, else the cheap upper bound
    nearest: torch.Tensor  # [c, L] int64: the bank feature each distance is to
    full: torch.Tensor  # [c, L] bool: searched in full


def bounded_distances(index: ShortlistIndex, features: torch.Tensor, valid: torch.Tensor) -> BoundedDistances:
    """features [c, L, D] of c windows, valid [c, L] (the patches inspected) -> each window's patch distances,
    exact enough that `where(valid, distances, -inf).max(1)` equals the full search's maximum and its patch."""
    count, patches, dim = features.shape
    queries = features.reshape(-1, dim)
    distances, nearest = index.upper_bounds(queries, BOUND_PROBES, BOUND_CANDIDATES)
    result = BoundedDistances(distances.reshape(count, patches), nearest.reshape(count, patches),
                              torch.zeros(count, patches, dtype=torch.bool, device=valid.device))
    upper = torch.where(valid, result.distances, float("-inf"))
    seeds = torch.zeros_like(valid).scatter_(1, upper.topk(min(SEED_PATCHES, patches), dim=1).indices, True)
    _search_fully(index, queries, result, seeds & valid)
    floor = torch.where(result.full, result.distances, float("-inf")).max(dim=1).values  # [c]
    _search_fully(index, queries, result, valid & ~result.full & (upper >= floor[:, None]))
    return result


def complete(index: ShortlistIndex, features: torch.Tensor, bounded: BoundedDistances, valid: torch.Tensor,
             rows: torch.Tensor) -> None:
    """Search in full every valid patch of the windows `rows` (bool [c]) not searched in full yet: their
    distances are then a map's (in place)."""
    _search_fully(index, features.reshape(-1, features.shape[-1]), bounded,
                  valid & ~bounded.full & rows.to(valid.device)[:, None])


def _search_fully(index: ShortlistIndex, queries: torch.Tensor, bounded: BoundedDistances, which: torch.Tensor
                  ) -> None:
    """The full search for the patches `which` [c, L]; each keeps the nearer of its two shortlists' best."""
    flat = which.reshape(-1).nonzero()[:, 0]
    if len(flat):
        distances, nearest = index.search(queries[flat], k=1)
        current = bounded.distances.view(-1)
        closer = distances[:, 0] < current[flat]
        current[flat] = torch.where(closer, distances[:, 0], current[flat])
        bounded.nearest.view(-1)[flat] = torch.where(closer, nearest[:, 0], bounded.nearest.view(-1)[flat])
    bounded.full |= which
