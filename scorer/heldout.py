"""Scores of training images as the shipped bank scores an unseen good image: leave-one-out coresets.

A threshold must describe what the shipped bank does to good images it never saw. The k-fold scores
(each fold against a coreset of the other folds) come from banks of (k-1)/k of the images: sparser
coverage, so good scores that can run high, the more so the fewer the images. Simply dropping an image's
own points from the shipped coreset is worse: the greedy selection picked exactly the image's patches
that nothing else covered, and without them its outlying patches meet holes no unseen image would meet
(measured on bottle, 30 images: good scores 0.9 above the test images' mean, bench/threshold_sizes.py).

So each training image i is scored against the coreset the build would have made without it: the shipped
coreset less the points i (and, for video frames, its near-twin neighbours) contributed, repaired by
continuing the same greedy selection (`extend_coreset`, as a bank update does) over the other images'
patches those points covered (their nearest coreset point in the projected space), until every one of
them is back within the coverage radius or the removed points' budget is spent. That bank has the
shipped bank's size and coverage and never saw image i: a leave-one-out coreset for the price of a small
extension per image. Scoring: the scorer's exact search and Eq. 7 on that bank (equal to
`PatchCoreScorer(bank, search="exact").score_patches`, tests/test_calibration.py).

Cost. The shipped coreset's vectors are read once; image i's bank is that array with its removed rows masked
(`HeldOutBank`), never a copy. An image's score needs only its highest patch distance, so each patch gets an
upper bound first - its true distance to its nearest kept point in the projected space (`nearest_cells`, one
pass over all patches for every image at once) - and only patches whose bound can still beat the highest
exact distance found are searched exactly, in decreasing order of bound: on bottle (209 images, 16k-row
bank) one chunk of 32 patches per image instead of 784 (counted), the build ~3x faster (bench/build_time.py)
with the same scores up to float rounding (identical on bottle and macaroni1).
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from .coreset import BLOCK_ELEMENTS, extend_coreset

EXACT_CHUNK = 32  # patches searched exactly at a time, in decreasing order of their bound


class PatchSource(Protocol):
    """The training patches (scorer.model.PatchStore): projected [P, d] in memory, full vectors on demand."""

    projected: np.ndarray  # [P, d] float32
    offsets: np.ndarray  # [N + 1] int64: image i owns patches offsets[i]:offsets[i + 1]

    def gather(self, indices: np.ndarray) -> np.ndarray: ...  # [len, D] float32

    def image(self, i: int) -> np.ndarray: ...  # [P_i, D] float32


def bank_owners(selected: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The training image each bank feature came from: global patch indices [M] -> image indices [M]."""
    return np.searchsorted(offsets, np.asarray(selected, dtype=np.int64), side="right").astype(np.int64) - 1


def exclusion_ranges(n_images: int, twin_window: int) -> np.ndarray:
    """Per image, the [first, last] image indices it must not be scored against: itself, and its
    `twin_window` neighbours on each side (consecutive video frames are near-twins). [N, 2] int64."""
    if twin_window < 0:
        raise ValueError(f"twin window must be >= 0, got {twin_window}")
    i = np.arange(n_images, dtype=np.int64)
    return np.stack([np.maximum(i - twin_window, 0), np.minimum(i + twin_window, n_images - 1)], axis=1)


def nearest_cells(projected: torch.Tensor, centres: torch.Tensor, owners: np.ndarray,
                  patch_images: np.ndarray, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each training patch's nearest centre (its cell), and its nearest centre owned by no image its own image
    leaves out (-1 when every centre is): [P] int64 each, in the projected space the selection used.

    projected [P, d]: the patches; centres [M, d]: the coreset; owners [M]: each centre's image;
    patch_images [P]: each patch's image, non-decreasing (patches in image order, as the PatchStore holds them);
    excluded [N, 2]: the inclusive image range each image leaves out.
    One pass over each block's distances: an image's left-out centres (few) are read aside, then masked."""
    by_owner = np.argsort(owners, kind="stable")  # image j's left-out centres: by_owner[first[j]:end[j]]
    first = np.searchsorted(owners[by_owner], excluded[:, 0], side="left")
    end = np.searchsorted(owners[by_owner], excluded[:, 1], side="right")
    centres_sq = (centres * centres).sum(dim=1)
    step = max(1, BLOCK_ELEMENTS // max(len(centres), 1))
    cell = np.empty(len(projected), dtype=np.int64)
    held = np.empty(len(projected), dtype=np.int64)
    for begin in range(0, len(projected), step):
        partial = torch.addmm(centres_sq, projected[begin:begin + step], centres.T, beta=1.0, alpha=-2.0)
        aside = torch.full((len(partial),), float("inf"))
        aside_where = torch.zeros(len(partial), dtype=torch.int64)
        images, starts = np.unique(patch_images[begin:begin + len(partial)], return_index=True)
        for image, top, bottom in zip(images, starts, np.r_[starts[1:], len(partial)]):
            columns = torch.from_numpy(by_owner[first[image]:end[image]])
            if len(columns):
                rows = partial[top:bottom]
                best, where = rows.index_select(1, columns).min(dim=1)
                aside[top:bottom], aside_where[top:bottom] = best, columns[where]
                rows.index_fill_(1, columns, float("inf"))
        best, where = partial.min(dim=1)
        # a tie goes to the lower centre index, as one argmin over all centres would give it
        aside_wins = (aside < best) | ((aside == best) & (aside_where < where))
        cell[begin:begin + len(partial)] = torch.where(aside_wins, aside_where, where).numpy()
        held[begin:begin + len(partial)] = torch.where(torch.isinf(best), -1, where).numpy()
    return cell, held


class HeldOutBank:
    """One image's leave-one-out coreset without copying the shipped one: the shipped coreset's rows [M, D]
    with the removed ones masked out, then the rows the repair added [A, D]. A row's id is its position in
    that order (0..M-1 shipped, M.. added): the rows of `LeaveOut.rows(i)`, in its order, under other ids."""

    def __init__(self, shipped: torch.Tensor, shipped_sq: torch.Tensor, removed: torch.Tensor,
                 added: torch.Tensor):
        self.shipped, self.shipped_sq, self.removed, self.added = shipped, shipped_sq, removed, added
        self.added_sq = (added * added).sum(dim=1)
        self.size = len(shipped) - int(removed.sum()) + len(added)
        self.max_sq = float(torch.cat([shipped_sq[~removed], self.added_sq]).max()) if self.size else 0.0

    def partial(self, queries: torch.Tensor) -> torch.Tensor:
        """[Q, M + A] squared distances less |q|^2 (the order of a query's rows); removed rows +inf."""
        out = torch.addmm(self.shipped_sq, queries, self.shipped.T, beta=1.0, alpha=-2.0)
        out.masked_fill_(self.removed[None, :], float("inf"))
        if len(self.added):
            out = torch.cat([out, torch.addmm(self.added_sq, queries, self.added.T, beta=1.0, alpha=-2.0)], dim=1)
        return out

    def nearest(self, queries: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Row ids [Q, k] of each query's k nearest rows (k <= size), nearest first, in blocks."""
        step = max(1, BLOCK_ELEMENTS // (len(self.shipped) + len(self.added)))
        out = []
        for begin in range(0, len(queries), step):
            partial = self.partial(queries[begin:begin + step])
            out.append(partial.argmin(dim=1, keepdim=True) if k == 1 else partial.topk(k, dim=1, largest=False).indices)
        return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.int64)

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows [..., D] of row ids [...]."""
        flat = ids.reshape(-1)
        out = torch.empty((len(flat), self.shipped.shape[1]), dtype=self.shipped.dtype)
        shipped = flat < len(self.shipped)
        out[shipped] = self.shipped[flat[shipped]]
        out[~shipped] = self.added[flat[~shipped] - len(self.shipped)]
        return out.reshape(*ids.shape, -1)

    def nearest_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """[Q] each query's distance to its nearest row in scorer.coreset.nearest_distance's arithmetic (the
        smallest |m|^2 - 2 q.m, plus |q|^2, square root): what the greedy selection's own distances are."""
        step = max(1, BLOCK_ELEMENTS // (len(self.shipped) + len(self.added)))
        out = [self.partial(queries[b:b + step]).amin(dim=1) for b in range(0, len(queries), step)]
        smallest = torch.cat(out) if out else queries.new_zeros(0)
        return (smallest + (queries * queries).sum(dim=1)).clamp_(min=0.0).sqrt_()

    def distances(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's true L2 distance to its nearest row [Q] (|q - m*|, not the expansion) and that row's id [Q]."""
        nearest = self.nearest(queries)[:, 0]
        return torch.linalg.vector_norm(queries - self.vectors(nearest), dim=1), nearest

    def eq7_weight(self, patch: torch.Tensor, anchor: int, neighbours: int) -> float:
        """Eq. 7's 1 - softmax(d)[0] for an image's highest patch [D] whose nearest row is `anchor`: d its
        distances to the anchor's `neighbours` nearest rows (1.0 for neighbours <= 1: the plain maximum)."""
        if neighbours <= 1:
            return 1.0
        support = self.nearest(self.vectors(torch.tensor([anchor])), min(neighbours, self.size))[0]
        d = torch.linalg.vector_norm(self.vectors(support) - patch[None], dim=1)
        return float(1.0 - torch.softmax(d, dim=0)[0])

    def image_score(self, patches: torch.Tensor, bounds: torch.Tensor, neighbours: int) -> float:
        """An image's score: its highest patch distance times Eq. 7's weight, as the exact search gives it.

        patches [P, D]; bounds [P]: an upper bound of each patch's distance (its true distance to some rows).
        A patch's exact value (its true distance to the row the expansion finds nearest) can exceed its bound
        only by the expansion's rounding, so each patch may reach sqrt(bound^2 + slack), slack a float32 D-term
        dot product's worst-case error on |q|^2 + |m|^2. Patches are searched exactly in decreasing order of
        that reach, and the search stops at the first whose reach is below the highest exact distance found:
        no patch left can exceed it. Ties go to the lowest patch index, as a search of all patches at once."""
        slack = 2 * patches.shape[1] * torch.finfo(patches.dtype).eps * ((patches * patches).sum(dim=1) + self.max_sq)
        reach = (bounds * bounds + slack).sqrt()
        order = torch.argsort(reach, descending=True)
        top, where, anchor = -1.0, len(patches), 0
        for begin in range(0, len(order), EXACT_CHUNK):
            chunk = order[begin:begin + EXACT_CHUNK]
            if float(reach[chunk[0]]) < top:
                break
            distances, nearest = self.distances(patches[chunk])
            value = float(distances.max())
            tied = torch.nonzero(distances == value).flatten()
            pick = tied[torch.argmin(chunk[tied])]
            if value > top or (value == top and int(chunk[pick]) < where):
                top, where, anchor = value, int(chunk[pick]), int(nearest[pick])
        return top * self.eq7_weight(patches[where], anchor, neighbours)


class LeaveOut:
    """Leave-one-out coresets of a built coreset (see the module doc): `rows(i)`, `bank(i)` and `scores(neighbours)`."""

    def __init__(self, store: PatchSource, selected: np.ndarray, radius: float, excluded: np.ndarray):
        """selected: the shipped coreset's global patch indices [M]; radius: its coverage radius (projected);
        excluded: [N, 2] inclusive image ranges left out with each image (`exclusion_ranges`)."""
        self.store = store
        self.selected = np.asarray(selected, dtype=np.int64)
        self.radius = float(radius)
        self.excluded = np.asarray(excluded, dtype=np.int64)
        self.owners = bank_owners(self.selected, store.offsets)
        self.centres = torch.from_numpy(np.ascontiguousarray(store.projected[self.selected]))  # [M, d]
        self.centres_sq = (self.centres * self.centres).sum(dim=1)
        patch_images = np.searchsorted(store.offsets, np.arange(store.offsets[-1]), side="right") - 1
        # each training patch's nearest coreset point (its cell), and its nearest one that stays in its own
        # image's leave-one-out coreset (a row to bound its distance there from above)
        self.cell, self.held_cell = nearest_cells(torch.from_numpy(np.ascontiguousarray(store.projected)), self.centres,
                                                  self.owners, patch_images, self.excluded)
        self._shipped: torch.Tensor | None = None  # the coreset's full vectors [M, D], read once when first scored

    def split(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's leave-one-out coreset as (removed [M] bool over the shipped coreset, the repair's added
        global patch indices [A])."""
        lo, hi = (int(v) for v in self.excluded[i])
        removed = (self.owners >= lo) & (self.owners <= hi)
        none = np.zeros(0, dtype=np.int64)
        if removed.all():
            raise ValueError(f"image {i}: every coreset point belongs to an excluded image; nothing to score against")
        if not removed.any():
            return removed, none
        first, last = self.store.offsets[lo], self.store.offsets[hi + 1]
        orphans = np.flatnonzero(removed[self.cell])
        orphans = orphans[(orphans < first) | (orphans >= last)]  # the excluded images' own patches stay out
        if not len(orphans):
            return removed, none
        # the orphans' distances to the kept coreset (the removed points masked), then the greedy continues there
        points = torch.from_numpy(np.ascontiguousarray(self.store.projected[orphans]))
        kept = HeldOutBank(self.centres, self.centres_sq, torch.from_numpy(removed), self.centres[:0])
        initial = kept.nearest_distance(points).numpy()
        added = extend_coreset(None, points.numpy(), self.radius, max_new=int(removed.sum()), initial=initial).indices
        return removed, orphans[added]

    def rows(self, i: int) -> np.ndarray:
        """Global patch indices of image i's leave-one-out coreset: the kept points, then the repair's."""
        removed, added = self.split(i)
        return np.concatenate([self.selected[~removed], added])

    def bank(self, i: int) -> HeldOutBank:
        """Image i's leave-one-out coreset (the full vectors)."""
        if self._shipped is None:
            self._shipped = torch.from_numpy(self.store.gather(self.selected))
            self._shipped_sq = (self._shipped * self._shipped).sum(dim=1)
        removed, added = self.split(i)
        return HeldOutBank(self._shipped, self._shipped_sq, torch.from_numpy(removed),
                           torch.from_numpy(self.store.gather(added)))

    def patches(self, i: int) -> torch.Tensor:
        """Image i's patches [P, D] (memmap rows: a copy)."""
        return torch.from_numpy(np.array(self.store.image(i), dtype=np.float32))

    def bounds(self, i: int, bank: HeldOutBank, patches: torch.Tensor) -> torch.Tensor:
        """Upper bounds [P] of image i's patch distances in its leave-one-out coreset: the true distance to the
        nearest kept row in the projected space, or to the nearest row the repair added if that is nearer."""
        span = slice(int(self.store.offsets[i]), int(self.store.offsets[i + 1]))
        held = torch.from_numpy(self.held_cell[span])
        out = torch.full((len(patches),), float("inf"))
        kept = held >= 0
        out[kept] = torch.linalg.vector_norm(patches[kept] - bank.shipped[held[kept]], dim=1)
        if len(bank.added):
            nearest = torch.addmm(bank.added_sq, patches, bank.added.T, beta=1.0, alpha=-2.0).argmin(dim=1)
            out = torch.minimum(out, torch.linalg.vector_norm(patches - bank.added[nearest], dim=1))
        return out

    @torch.inference_mode()
    def scores(self, neighbours: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's score [N] float64 against its leave-one-out coreset (Eq. 7 with b =
        `neighbours`; <= 1: the plain highest patch distance); progress(1) after each image.

        Each patch's distance is bounded from above (`bounds`), and only patches whose bound can still beat
        the image's highest exact distance are searched exactly (`HeldOutBank.image_score`): the exact
        search's score, for a few dozen patches' full searches instead of every patch's."""
        n_images = len(self.store.offsets) - 1
        out = np.zeros(n_images, dtype=np.float64)
        for i in range(n_images):
            bank, patches = self.bank(i), self.patches(i)
            out[i] = bank.image_score(patches, self.bounds(i, bank, patches), neighbours)
            if progress is not None:
                progress(1)
        return out

    @torch.inference_mode()
    def patch_distances(self, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's patch distances against its leave-one-out coreset (true L2 to the nearest
        row), for per-position statistics (scorer/position.py): [N, P] float32, all images having P patches."""
        n_images = len(self.store.offsets) - 1
        counts = np.diff(self.store.offsets)
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"training images give {sorted(set(counts.tolist()))} patches: per-position statistics "
                             f"need one layout (images of one size)")
        out = np.zeros((n_images, int(counts[0])), dtype=np.float32)
        for i in range(n_images):
            out[i] = self.bank(i).distances(self.patches(i))[0].numpy()
            if progress is not None:
                progress(1)
        return out

    @torch.inference_mode()
    def normalised_scores(self, z: np.ndarray, neighbours: int,
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Every training image's score [N] float64 from its normalised patch scores z [N, P]: the highest z
        times Eq. 7's weight of that patch against its leave-one-out coreset (as `scores` does with distances)."""
        out = np.zeros(len(z), dtype=np.float64)
        for i, row in enumerate(z):
            where = int(np.argmax(row))
            weight = 1.0
            if neighbours > 1:
                full = self.bank(i)
                patch = torch.from_numpy(np.array(self.store.image(i)[where], dtype=np.float32))
                weight = full.eq7_weight(patch, int(full.nearest(patch[None])[0, 0]), neighbours)
            out[i] = float(row[where]) * weight
            if progress is not None:
                progress(1)
        return out
