"""Approximate greedy coreset subsampling (paper Algorithm 1), O(N*d) memory.

Features are randomly projected to `projection_dim` dims; the minimum distances start as the mean
distance to `start_points` random points (not themselves selected, as the official code); then
each step picks the point farthest from the selected set.

Bounded memory: `random_projection` is deterministic and row-wise (projecting chunks and stacking
equals projecting the whole, bit for bit), so a build can project each feature batch as it comes off
the backbone and hand the projected [N, 128] points to `select_coreset(None, config, projected=...)`.

CPU engine ("numba"), two exact passes, chosen per chunk of steps from counts (never from timings,
so runs are reproducible):
- dense: the plain step (one BLAS matrix-vector product over all points), then one fused pass that
  turns the products into distances, updates the minimum distances and the running maxima (numpy needs
  five passes for that). Never slower than the plain loop; the loop starts with it.
- pruned: after PROBE_AFTER of the steps the points are grouped into compact blocks (centre, radius);
  a step skips every block the new centre cannot reach and, per point, every x whose nearest selected
  centre a has d(a, c) >= 2 * mind(x) (triangle inequality). It pays on clustered data (bottle: most
  points skipped late in the loop); on texture-like data it still has to compute ~98 % of the points and
  its bookkeeping makes it slower than the dense pass. One-step probes decide (`_pruning_pays`, a cost
  model over the counts); after a failed probe the spacing to the next doubles (up to 1/16 of the steps),
  so trying costs well under 1 % of a build where pruning never pays.
Both give the plain algorithm's selection up to float rounding.

GPU engine ("torch"): the plain dense step in torch (matrix-vector product, min, argmax), with no
host synchronisation per step; it runs on any torch device, CPU included, optionally in float16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from .config import CoresetConfig

BLOCKS_PER_SQRT_N = 8.0  # measured on bottle features: 2 -> 11 s, 8 -> 9 s, 24 -> slower
PROJECTION_ROWS = 512  # rows per matrix product: fixed, so any chunking gives the same floats
BLOCK_ELEMENTS = 1 << 22  # distance-matrix elements per block of a nearest-row search (16 MB: stays in cache)
CHUNKS = 200  # pass choice and progress every 1/CHUNKS of the steps
# pruned pass while (computed + reached / 4) stays below this share of all points per step (_pruning_pays);
# measured: on textures the pruned pass computes ~98 % of the points at every step, on bottle far fewer
PRUNE_WORTH = 0.5
# in dense mode, probe the pruned pass again after REPROBE chunks, the spacing doubling after each failed
# probe up to 1/16 of the steps (pruning improves as the radii shrink; on textures it never pays)
REPROBE = 8
PROBE_AFTER = 0.05  # share of the steps always run dense (early on nothing can be pruned)
PROBE_STEPS = 1  # pruned steps per probe (one costs ~1.5-2 dense steps)
MIN_STEPS_FOR_BLOCKS = 200  # fewer steps left than this: building blocks (~N * 100 * d flops) does not pay


@dataclass(frozen=True)
class CoresetSelection:
    indices: np.ndarray  # [M] int64, positions in the input, in selection order
    radius: float  # coverage radius in the projected space: largest distance of an input to its nearest pick


def projection_matrix(in_dim: int, dim: int, seed: int) -> np.ndarray:
    """The Gaussian map [in_dim, dim] used by `random_projection` (depends only on its arguments)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((in_dim, dim), dtype=np.float32) / np.float32(math.sqrt(dim))


def random_projection(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Gaussian random linear map to `dim` dims (Johnson-Lindenstrauss), float32; identity if D <= dim.

    Row-wise and deterministic: projecting any split of the rows and stacking gives the same floats
    (products run in fixed blocks of PROJECTION_ROWS rows, the last one zero-padded).
    """
    if features.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {features.shape}")
    if features.shape[1] <= dim:
        return np.ascontiguousarray(features, dtype=np.float32)
    matrix64 = projection_matrix(features.shape[1], dim, seed).astype(np.float64)
    out = np.empty((len(features), dim), dtype=np.float32)
    for begin in range(0, len(features), PROJECTION_ROWS):
        block = np.asarray(features[begin:begin + PROJECTION_ROWS], dtype=np.float32)
        if len(block) < PROJECTION_ROWS:
            block = np.concatenate([block, np.zeros((PROJECTION_ROWS - len(block), block.shape[1]), np.float32)])
        # in float64, rounded to float32: BLAS kernels may sum a row in another order depending on where it lies in
        # the block (edge tiles), which float32 would show in its last bits; float64 hides it in the rounding
        out[begin:begin + PROJECTION_ROWS] = (block.astype(np.float64) @ matrix64)[:len(out) - begin]
    return out


def start_distances(projected: np.ndarray, n_start: int, seed: int) -> np.ndarray:
    """Initial minimum distances: mean Euclidean distance to `n_start` random points."""
    rng = np.random.default_rng(seed)
    starts = projected[rng.integers(0, len(projected), size=n_start)]
    sq = (projected * projected).sum(1)[:, None] + (starts * starts).sum(1)[None, :] - 2.0 * projected @ starts.T
    return np.sqrt(np.maximum(sq, 0.0)).mean(axis=1).astype(np.float32)


def nearest_distance(points: np.ndarray, core: np.ndarray, batch: int | None = None) -> np.ndarray:
    """[N] Euclidean distance from each point to its nearest row of `core` (float32, in blocks of `batch`
    points; by default as many as keep a block's distance matrix near BLOCK_ELEMENTS, in cache)."""
    core = np.asarray(core, dtype=np.float32)
    core_sq = (core * core).sum(1)
    step = batch or max(1, BLOCK_ELEMENTS // max(len(core), 1))
    out = np.empty(len(points), dtype=np.float32)
    for begin in range(0, len(points), step):
        block = np.asarray(points[begin:begin + step], dtype=np.float32)
        partial = block @ core.T  # |c|^2 - 2 p.c, in place: the point's own |p|^2 is added to the minimum
        partial *= -2.0
        partial += core_sq[None, :]
        out[begin:begin + step] = np.sqrt(np.maximum(partial.min(axis=1) + (block * block).sum(1), 0.0))
    return out


def coverage_radius(points: np.ndarray, coreset: np.ndarray, batch: int | None = None) -> float:
    """Largest distance from any point to its nearest coreset point (in the given space)."""
    return float(nearest_distance(points, points[coreset], batch).max())


def coreset_size(n_total: int, fraction: float) -> int:
    return max(1, min(n_total, int(n_total * fraction)))


def greedy_coreset(features: np.ndarray | None, config: CoresetConfig, progress: Callable[[int], None] | None = None,
                   projected: np.ndarray | None = None, **engine) -> np.ndarray:
    """Indices of the coreset in selection order (`select_coreset` without the radius)."""
    return select_coreset(features, config, progress, projected, **engine).indices


def select_coreset(features: np.ndarray | None, config: CoresetConfig, progress: Callable[[int], None] | None = None,
                   projected: np.ndarray | None = None, *, engine: str = "numba", device: str = "cpu",
                   half: bool = False) -> CoresetSelection:
    """Greedy coreset (int(N * fraction) points, at least one) and its coverage radius.

    features: [N, D]; or None with `projected`: the features already passed through
        `random_projection(..., config.projection_dim, config.seed)`, chunk by chunk (same selection;
        builds that never hold all features in memory).
    engine: "numba" (CPU; the dense pass's product uses BLAS's threads) or "torch" (`device`, e.g. "cuda";
        `half` stores the points in float16 there: half the memory traffic, selection may differ by rounding).
    progress: called with the number of points selected since the last call.
    """
    if projected is None:
        projected = random_projection(features, config.projection_dim, config.seed)
    elif projected.ndim != 2 or projected.shape[1] > config.projection_dim:
        raise ValueError(f"projected points must be [N, {config.projection_dim}], got shape {projected.shape}")
    points = np.ascontiguousarray(projected, dtype=np.float32)
    if len(points) == 0:
        raise ValueError("no points to select a coreset from")
    initial = start_distances(points, config.start_points, config.seed)
    n_select = coreset_size(len(points), config.fraction)
    return _greedy(points, initial, False, n_select, -1.0, config.seed, progress, engine, device, half)


def extend_coreset(existing: np.ndarray | None, new: np.ndarray, radius: float, max_new: int,
                   progress: Callable[[int], None] | None = None, *, engine: str = "numba", device: str = "cpu",
                   half: bool = False, initial: np.ndarray | None = None) -> CoresetSelection:
    """Continue the greedy selection of a bank over new points (bank updates without a full rebuild).

    existing [M, d]: the bank's coreset, new [K, d]: the new patches, both projected with the bank's
    `random_projection`; radius: the coverage radius the bank recorded. New points start at their
    distance to the nearest existing coreset point; farthest-point steps over them stop as soon as every
    new point is within `radius` (so already covered data adds nothing) or after `max_new` points (a bank
    update passes coreset_size(K, fraction), the build's own budget for K points).
    initial [K]: the new points' distances to `existing`, when the caller has them (`existing` is then not
    read and may be None).
    Returns the indices into `new` of the points to add, in order, and the coverage radius of the new
    points by the extended coreset (the bank's radius afterwards is max(radius, that)).
    """
    if new.ndim != 2 or (existing is not None and (existing.ndim != 2 or existing.shape[1] != new.shape[1])):
        raise ValueError(f"coreset {getattr(existing, 'shape', None)} and new points {new.shape} must be [M, d] and "
                         f"[K, d]")
    if initial is None:
        if existing is None:
            raise ValueError("extending a coreset needs its points or the new points' distances to them (initial)")
        initial = nearest_distance(new, existing) if len(new) else np.zeros(1, np.float32)
    elif np.shape(initial) != (len(new),):
        raise ValueError(f"initial distances {np.shape(initial)} must be one per new point ({len(new)})")
    initial = np.ascontiguousarray(initial, dtype=np.float32)
    if len(new) == 0 or max_new < 1:
        return CoresetSelection(np.empty(0, dtype=np.int64), float(initial.max()) if len(initial) else 0.0)
    new = np.ascontiguousarray(new, dtype=np.float32)
    return _greedy(new, initial, True, max_new, float(radius), 0, progress, engine, device, half)


def _greedy(points: np.ndarray, initial: np.ndarray, initial_is_distance: bool, n_max: int, stop_at: float,
            seed: int, progress: Callable[[int], None] | None, engine: str, device: str,
            half: bool) -> CoresetSelection:
    """Farthest-point steps from `initial` min-distances: up to n_max, stopping once the max is <= stop_at.

    initial_is_distance: the initial values are distances to real centres (extension), so the final
    min-distances are exact; otherwise (start estimates) points never updated are measured at the end.
    """
    if engine == "torch":
        selected, mind = _greedy_torch(points, initial, n_max, stop_at, progress, device, half)
    elif engine == "numba":
        if half:
            raise ValueError("half precision is available with engine='torch' only (numba has no float16)")
        selected, mind = _greedy_numba(points, initial, n_max, stop_at, seed, progress)
    else:
        raise ValueError(f"unknown coreset engine {engine!r}: use 'numba' or 'torch'")
    # points never moved below their start value may be farther from the selection than that value
    stale = mind >= initial
    if not initial_is_distance and stale.any() and len(selected):
        mind[stale] = nearest_distance(points[stale], points[selected])
    return CoresetSelection(selected, float(mind.max()))


def _greedy_numba(points, initial, n_max, stop_at, seed, progress) -> tuple[np.ndarray, np.ndarray]:
    """CPU loop: dense steps over all points in input order (one block) up to PROBE_AFTER of the steps;
    then, if enough steps remain (else the loop stays dense), the points are grouped into blocks and
    probes of PROBE_STEPS pruned steps follow (spacing from REPROBE chunks, doubling after each failure);
    when one pays (`_pruning_pays`), pruned chunks run until one does not."""
    order = np.arange(len(points))
    offsets = np.array([0, len(points)], dtype=np.int64)  # one block until the blocks are built
    block_centres = block_radius = None
    mind = initial.copy()
    norms = np.einsum("ij,ij->i", points, points)
    block_max = np.array([mind.max()], dtype=np.float32)
    selected = np.empty(n_max, dtype=np.int64)
    nearest = np.full(len(points), -1, dtype=np.int32)
    centre_dist = np.empty(n_max, dtype=np.float32)
    centre_stamp = np.full(n_max, -1, dtype=np.int64)
    chunk = max(1, n_max // CHUNKS)
    done, dense, blocked, spacing, next_probe = 0, True, False, REPROBE * chunk, int(PROBE_AFTER * n_max)
    while done < n_max:
        end = min(n_max, done + chunk)
        if dense and done >= next_probe and (blocked or n_max - done >= MIN_STEPS_FOR_BLOCKS):
            if not blocked:  # group into blocks once
                blocked = True
                order, offsets = _blocks(points, seed)
                position = np.empty_like(order)
                position[order] = np.arange(len(order))
                selected[:done] = position[selected[:done]]
                points, mind, nearest, norms = (np.ascontiguousarray(x[order]) for x in (points, mind, nearest, norms))
                block_centres, block_radius = _block_geometry(points, offsets)
                block_max = np.maximum.reduceat(mind, offsets[:-1]).astype(np.float32)
            end = min(end, done + PROBE_STEPS)
            stop, scanned, computed = _pruned_steps(points, mind, nearest, selected, centre_dist, centre_stamp,
                                                    offsets, block_centres, block_radius, block_max, done, end,
                                                    stop_at)
            dense = not _pruning_pays(scanned, computed, stop - done, len(points))
            spacing = min(2 * spacing, max(chunk, n_max // 16)) if dense else REPROBE * chunk  # back off on failure
            next_probe = stop + spacing
        elif dense:
            stop, centre = end, _farthest(mind, offsets, block_max)
            for step in range(done, end):  # the matrix-vector product is BLAS's; the rest one fused pass
                if mind[centre] <= stop_at:
                    stop = step
                    break
                selected[step] = centre
                centre = _dense_update(points @ points[centre], norms, norms[centre], mind, nearest, step, offsets,
                                       block_max)
        else:
            stop, scanned, computed = _pruned_steps(points, mind, nearest, selected, centre_dist, centre_stamp,
                                                    offsets, block_centres, block_radius, block_max, done, end,
                                                    stop_at)
            dense = not _pruning_pays(scanned, computed, stop - done, len(points))
            next_probe = stop + spacing
        if progress is not None:
            progress(stop - done)
        covered = stop < end  # the loop reached stop_at
        done = stop
        if covered:
            break
    mind_out = np.empty_like(mind)
    mind_out[order] = mind
    return order[selected[:done]], mind_out


def _pruning_pays(scanned: int, computed: int, steps: int, n_points: int) -> bool:
    """Cost model: a pruned step costs a distance per computed point plus a quarter of one per point of
    a reached block (bookkeeping); a dense step one BLAS product row per point, ~PRUNE_WORTH of a distance."""
    return computed + scanned / 4 <= PRUNE_WORTH * n_points * max(steps, 1)


def _greedy_torch(points, initial, n_max, stop_at, progress, device, half) -> tuple[np.ndarray, np.ndarray]:
    import torch

    data = torch.from_numpy(points).to(device)
    norms = (data * data).sum(1)
    if half:
        data = data.half()
    mind = torch.from_numpy(initial).to(device).clone()
    selected = torch.empty(n_max, dtype=torch.int64, device=device)
    reached = torch.empty(n_max, dtype=torch.float32, device=device)  # max min-distance when each was picked
    chunk = max(1, n_max // CHUNKS)
    done = 0

    def add_centre(centre: torch.Tensor) -> None:
        sq = norms + norms[centre] - 2.0 * (data @ data[centre]).float()
        torch.minimum(mind, sq.clamp_(min=0.0).sqrt_(), out=mind)

    with torch.no_grad():
        while done < n_max:
            end = min(n_max, done + chunk)
            for step in range(done, end):
                centre = torch.argmax(mind)
                selected[step] = centre
                reached[step] = mind[centre]
                add_centre(centre)
            if stop_at >= 0:
                covered = torch.nonzero(reached[done:end] <= stop_at)
                if len(covered):  # greedy is prefix-consistent: drop the steps after the cover was reached
                    end = done + int(covered[0])
                    if progress is not None:
                        progress(end - done)
                    done = end
                    break
            if progress is not None:
                progress(end - done)
            done = end
    if done < n_max:  # recompute the min-distances of the kept prefix
        mind.copy_(torch.from_numpy(initial))
        with torch.no_grad():
            for centre in selected[:done]:
                add_centre(centre)
    return selected[:done].cpu().numpy(), mind.cpu().numpy()


def _blocks(points: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition points into ~8 sqrt(N) compact blocks, in two levels so it costs O(N * N^(1/4) * d):
    each point joins the nearest of ~sqrt(blocks) random coarse seeds, then the nearest of its coarse
    group's own random fine seeds (as many as the group's share of the blocks).

    Returns the sort order grouping blocks and the block offsets into it. The blocks only decide
    what can be skipped; they never change the selection.
    """
    n_blocks = int(min(len(points), max(1, BLOCKS_PER_SQRT_N * math.sqrt(len(points)))))
    rng = np.random.default_rng(seed + 1)
    n_coarse = max(1, int(math.sqrt(n_blocks)))
    coarse = _nearest_seed(points, points[rng.choice(len(points), size=n_coarse, replace=False)])
    labels = np.empty(len(points), dtype=np.int64)
    groups = np.argsort(coarse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(coarse))])
    next_label = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = groups[lo:hi]
        if len(members) == 0:
            continue
        n_fine = max(1, min(len(members), int(round(n_blocks * len(members) / len(points)))))
        fine = points[members[rng.choice(len(members), size=n_fine, replace=False)]]
        labels[members] = next_label + _nearest_seed(points[members], fine)
        next_label += n_fine
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _nearest_seed(points: np.ndarray, seeds: np.ndarray, batch: int = 8192) -> np.ndarray:
    seed_sq = (seeds * seeds).sum(1)
    labels = np.empty(len(points), dtype=np.int64)
    for begin in range(0, len(points), batch):
        labels[begin:begin + batch] = np.argmin(seed_sq[None, :] - 2.0 * points[begin:begin + batch] @ seeds.T, axis=1)
    return labels


@numba.njit(cache=True, nogil=True)
def _block_geometry(points, offsets):
    """Centre (mean) and radius of each block of the block-sorted points, the radius with a margin
    so float rounding can never skip a point that should be updated."""
    n_blocks = len(offsets) - 1
    centres = np.empty((n_blocks, points.shape[1]), dtype=np.float32)
    radius = np.empty(n_blocks, dtype=np.float32)
    for b in range(n_blocks):
        acc = np.zeros(points.shape[1], dtype=np.float64)
        for i in range(offsets[b], offsets[b + 1]):
            acc += points[i]
        centres[b] = acc / (offsets[b + 1] - offsets[b])
        worst = np.float32(0.0)
        for i in range(offsets[b], offsets[b + 1]):
            worst = max(worst, _distance(points[i], centres[b]))
        radius[b] = worst * np.float32(1.001) + np.float32(1e-5)
    return centres, radius


# fastmath lets LLVM vectorise the reduction; only the summation order changes
@numba.njit(cache=True, nogil=True, fastmath=True)
def _distance(a: np.ndarray, b: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for k in range(a.shape[0]):
        diff = a[k] - b[k]
        acc += diff * diff
    return np.float32(math.sqrt(acc))


@numba.njit(cache=True, nogil=True)
def _farthest(mind, offsets, block_max):
    best_block = np.int64(np.argmax(block_max))
    lo = offsets[best_block]
    return lo + np.int64(np.argmax(mind[lo:offsets[best_block + 1]]))


@numba.njit(cache=True, nogil=True)
def _pruned_steps(points, mind, nearest, selected, centre_dist, centre_stamp,
                  offsets, block_centres, block_radius, block_max, begin, end, stop_at):
    """Steps begin..end with per-point pruning; returns (steps done, points in reached blocks, distances computed)."""
    n_blocks = block_centres.shape[0]
    scanned = 0
    computed = 0
    for step in range(begin, end):
        centre = _farthest(mind, offsets, block_max)
        if mind[centre] <= stop_at:
            return step, scanned, computed
        selected[step] = centre
        new = points[centre]
        for b in range(n_blocks):
            if _distance(block_centres[b], new) - block_radius[b] >= block_max[b]:
                continue
            scanned += offsets[b + 1] - offsets[b]
            worst = np.float32(0.0)
            for i in range(offsets[b], offsets[b + 1]):
                current = mind[i]
                owner = nearest[i]
                if owner >= 0:
                    if centre_stamp[owner] != step:  # d(owner, new centre), once per step
                        centre_dist[owner] = _distance(points[selected[owner]], new)
                        centre_stamp[owner] = step
                        computed += 1
                    if centre_dist[owner] >= 2.0 * current:
                        worst = max(worst, current)
                        continue
                d = _distance(points[i], new)
                computed += 1
                if d < current:
                    mind[i] = d
                    nearest[i] = step
                    current = d
                worst = max(worst, current)
            block_max[b] = worst
    return end, scanned, computed


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz"})  # no reassociation, no FMA contraction
def _dense_update(dots, norms, centre_norm, mind, nearest, step, offsets, block_max):
    """After the product: distance from the dot products and min-update (one SIMD pass, the plain loop's
    arithmetic), block maxima (a SIMD max per block), and the next centre: the first point of the
    largest min-distance, as np.argmax (found in the block that holds it)."""
    for i in range(len(mind)):
        d = np.float32(math.sqrt(max(norms[i] + centre_norm - np.float32(2.0) * dots[i], np.float32(0.0))))
        closer = d < mind[i]
        mind[i] = d if closer else mind[i]
        nearest[i] = step if closer else nearest[i]
    best_block, best_value = 0, np.float32(-1.0)
    for b in range(len(offsets) - 1):
        worst = np.float32(0.0)
        for i in range(offsets[b], offsets[b + 1]):
            worst = max(worst, mind[i])
        block_max[b] = worst
        if worst > best_value:
            best_block, best_value = b, worst
    for i in range(offsets[best_block], offsets[best_block + 1]):
        if mind[i] == best_value:
            return i
    return offsets[best_block]
