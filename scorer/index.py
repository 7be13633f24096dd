"""Nearest-neighbour search over the memory bank. Every search returns true (not squared) L2 distances.

Engines of the flat search (`kind`, `--index`):

- "faiss-cpu": FAISS IndexFlatL2 on the CPU.
- "faiss-gpu": FAISS GpuIndexFlatL2 on the scorer's CUDA device, when faiss is built with GPU support.
- "torch": batched matrix-product search with torch, on any device (the CUDA path without faiss-gpu).
- "auto": faiss-gpu if possible on CUDA, else torch on CUDA, else faiss-cpu.

The flat search finds the neighbours with the fast |q|^2 + |b|^2 - 2 q.b expansion; the distances it
reports are then recomputed as |q - b| for those neighbours, so every kind reports the same value
for the same neighbour (the expansion alone loses digits to cancellation, ~1e-3 relative).

Search methods (`SearchConfig.method`, `--search`): "exact" is the flat search over the whole bank. The
others find a shortlist of candidates cheaply and re-rank it exactly (|q - b| in float32 over all
dimensions): the reported distance is the true one, and the k nearest within the shortlist are exact.
A miss can only raise a patch's distance (the one reported is to a bank feature, never below the nearest);
Eq. 7's image score can then move either way (another m*, another support set). "auto" (the default) is
"ivf" on the CPU and "half" on CUDA, chosen by measurement. Thresholds are calibrated with "exact".

- "subspace": flat search (engine: `kind`) in the bank's principal subspace, bank mean removed. For b in
  the subspace, |q - b|^2 = |P(q - b)|^2 + |R q|^2 and |R q|^2 is the same for every b: with all the
  bank's dimensions (`dims` 0, its numerical rank) the ranking is exact; with fewer, approximate.
- "half": the flat search as one 16-bit matrix product over the centred bank (float16 on CUDA,
  bfloat16 where float16 products are slow, e.g. the CPU).
- "ivf", "hnsw": FAISS IVF-Flat / HNSW graph on the CPU, in the bank's `dims` leading principal
  directions (the same projection as "subspace"; 0: all of them). An ivf index also holds a cheap shortlist,
  a second IVF-Flat over the first BOUND_DIMS of those directions (`upper_bounds`: scorer/bounded.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

try:  # faiss-cpu or faiss-gpu, whichever the host has; without either, the torch search serves
    import faiss
except ImportError:  # pragma: no cover - both packages are optional at import time
    faiss = None

INDEX_KINDS = ("auto", "faiss-cpu", "faiss-gpu", "torch")
SEARCH_METHODS = ("auto", "exact", "subspace", "half", "ivf", "hnsw")
BOUND_DIMS = 32  # ivf: the leading principal directions of the cheap shortlist (`upper_bounds`, scorer/bounded.py)


class IndexError_(RuntimeError):
    pass


@dataclass(frozen=True)
class SearchConfig:
    """How the scorer finds the nearest bank features (every method reports true L2 distances).

    The default, "auto", is the measured default search of the device: on the CPU "ivf" with these settings
    (IVF in the bank's 128 leading principal directions, 16 of 2 sqrt(M) cells visited, 8 candidates
    re-ranked exactly; README, "Search speed"), on CUDA "half" (one 16-bit matrix product on the GPU).
    `SearchConfig.named(m)` gives each method's own measured settings (what `--search m` means)."""

    method: str = "auto"
    shortlist: int = 8  # candidates re-ranked exactly per query (k - 1 more when k neighbours are asked)
    dims: int = 128  # subspace, ivf, hnsw: principal directions the coarse search runs in; 0 = the bank's
    #                  numerical rank (exact ranking in the subspace)
    ivf_lists: int = 0  # ivf: k-means cells; 0 = 2 sqrt(bank size)
    ivf_probes: int = 16  # ivf: cells visited per query
    hnsw_links: int = 32  # hnsw: graph neighbours per node
    hnsw_ef: int = 64  # hnsw: search beam width

    def __post_init__(self):
        if self.method not in SEARCH_METHODS:
            raise IndexError_(f"unknown search {self.method!r}; choose from {', '.join(SEARCH_METHODS)}")
        if min(self.shortlist, self.ivf_probes, self.hnsw_links, self.hnsw_ef) < 1 or min(self.dims, self.ivf_lists) < 0:
            raise IndexError_(f"search settings out of range: {self}")

    @classmethod
    def named(cls, method: str) -> "SearchConfig":
        """The settings `--search METHOD` stands for: exact (today's numbers), subspace at full rank (exact
        ranking), half with 16 candidates, ivf as the CPU default, hnsw over all directions."""
        presets = {"exact": {}, "subspace": {"dims": 0, "shortlist": 1}, "half": {"shortlist": 16},
                   # hnsw in 128 directions lost image AUROC (macaroni1 0.64 vs 0.89): the graph over all of them
                   "hnsw": {"dims": 0, "hnsw_ef": 128, "shortlist": 16}}
        return cls(method=method, **presets.get(method, {}))

    def describe(self) -> str:
        """The settings that matter for this method, e.g. "ivf, dims=128, ivf_probes=16, shortlist=8"."""
        names = {"auto": (), "exact": (), "subspace": ("dims", "shortlist"), "half": ("shortlist",),
                 "ivf": ("dims", "ivf_lists", "ivf_probes", "shortlist"),
                 "hnsw": ("dims", "hnsw_links", "hnsw_ef", "shortlist")}[self.method]
        return ", ".join([self.method, *(f"{n}={getattr(self, n)}" for n in names)])

    def on(self, device: torch.device | str, kind: str = "auto") -> "SearchConfig":
        """This search as it runs on `device` with flat-search engine `kind`: "auto" resolved (CUDA: half's
        preset; CPU: ivf with these settings; exact where faiss is missing or another engine was asked for);
        any other method unchanged."""
        if self.method != "auto":
            return self
        if torch.device(device).type == "cuda":
            return SearchConfig.named("half") if kind in ("auto", "torch") else SearchConfig("exact")
        return replace(self, method="ivf") if faiss is not None and kind in ("auto", "faiss-cpu") else SearchConfig("exact")


def check_engine(search: SearchConfig, kind: str) -> None:
    """Refuse an index kind that a search method does not run on (half: torch; ivf, hnsw: faiss-cpu)."""
    engine = {"half": "torch", "ivf": "faiss-cpu", "hnsw": "faiss-cpu"}.get(search.method)
    if engine is not None and kind not in ("auto", engine):
        raise IndexError_(f"search {search.method} runs on {engine}; index kind {kind} does not apply to it")


def faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_kind(kind: str, device: torch.device) -> str:
    if kind not in INDEX_KINDS:
        raise IndexError_(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss-cpu" if faiss is not None else "torch"


def make_index(bank: np.ndarray, search: SearchConfig | str = SearchConfig(), kind: str = "auto",
               device: torch.device | str = "cpu") -> "NearestNeighbourIndex | ShortlistIndex":
    """The index `search` describes over bank [M, D] (a method name: its measured settings, SearchConfig.named)."""
    search = SearchConfig.named(search) if isinstance(search, str) else search
    search = search.on(device, kind)
    if search.method == "exact":
        return NearestNeighbourIndex(bank, kind, device)
    return ShortlistIndex(bank, search, kind, device)


RERANK_BLOCK_BYTES = 2 << 20  # the gathered candidates of one re-rank block: stays in the CPU's cache
RERANK_BLOCK_BYTES_CUDA = 256 << 20  # on a GPU: few large kernels


def rerank_block_bytes(device: torch.device) -> int:
    return RERANK_BLOCK_BYTES_CUDA if device.type == "cuda" else RERANK_BLOCK_BYTES


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                    max_block_bytes: int = RERANK_BLOCK_BYTES) -> torch.Tensor:
    """|q - bank[i]| for queries [Q, D] and indices [Q, S] (inf where an index is -1: none found).

    On the CPU with faiss: one fused pass (faiss.fvec_L2sqr_by_idx: each candidate's squared differences summed
    in place, no gathered copy; OpenMP over the queries): on the 2-core AVX2 EPYC ~8x less CPU time than the
    blocked torch path for 784 x 8 candidates of 1024 dims, the same sums to float rounding (2.4e-7 relative).
    Elsewhere in blocks small enough that each gathered [rows, S, D] block is subtracted and reduced while still
    in cache (on a 2-core Xeon, 2 MB blocks re-ranked 16 candidates ~3x faster than 256 MB blocks)."""
    if not len(queries):
        return queries.new_zeros(indices.shape)
    if faiss is not None and queries.device.type == "cpu" and bank.device.type == "cpu":
        return _faiss_distances(queries, bank, indices)
    return blocked_distances(queries, bank, indices, max_block_bytes)


def blocked_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                      max_block_bytes: int = RERANK_BLOCK_BYTES) -> torch.Tensor:
    """exact_distances with torch on any device: gathered blocks, subtracted and reduced while in cache."""
    if not len(queries):
        return queries.new_zeros(indices.shape)
    rows = max(1, max_block_bytes // (4 * bank.shape[1] * indices.shape[1]))
    out = torch.cat([torch.linalg.vector_norm(queries[b:b + rows, None, :] - bank[indices[b:b + rows].clamp(min=0)], dim=2)
                     for b in range(0, len(queries), rows)])
    return torch.where(indices >= 0, out, math.inf)


def _faiss_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """exact_distances on the CPU by faiss.fvec_L2sqr_by_idx (float32 arrays, C order; -1s: inf)."""
    q = np.ascontiguousarray(queries.detach().numpy(), dtype=np.float32)
    b = np.ascontiguousarray(bank.detach().numpy(), dtype=np.float32)
    ids = np.ascontiguousarray(indices.clamp(min=0).numpy(), dtype=np.int64)
    if ids.size and int(ids.max()) >= len(b):
        raise IndexError_(f"candidate index {int(ids.max())} outside the bank of {len(b)}")
    squared = np.empty(ids.shape, dtype=np.float32)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(squared), faiss.swig_ptr(q), faiss.swig_ptr(b), faiss.swig_ptr(ids),
                            q.shape[1], ids.shape[0], ids.shape[1])
    return torch.where(indices >= 0, torch.from_numpy(squared).sqrt_(), math.inf)


class NearestNeighbourIndex:
    """Exact k-NN over a fixed bank [M, D] (float32)."""

    search_config = SearchConfig("exact")

    def __init__(self, bank: np.ndarray, kind: str = "auto", device: torch.device | str = "cpu",
                 max_block_bytes: int = 256 << 20):
        self.device = torch.device(device)
        self.kind = resolve_kind(kind, self.device)
        self.size, self.dim = bank.shape
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self._max_block_bytes = max_block_bytes
        self._bank = torch.from_numpy(bank).to(self.device)
        if self.kind == "torch":
            self._bank_sq = (self._bank * self._bank).sum(1)
        elif self.kind == "faiss-gpu":
            if not faiss_has_gpu():
                raise IndexError_("index kind faiss-gpu asked for, but faiss has no GPU support here")
            self._resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = self.device.index or 0  # the scorer's own GPU, not hard-wired GPU 0
            self._faiss = faiss.GpuIndexFlatL2(self._resources, self.dim, config)
            self._faiss.add(bank)
        else:
            if faiss is None:
                raise IndexError_("index kind faiss-cpu asked for, but faiss is not installed")
            self._faiss = faiss.IndexFlatL2(self.dim)
            self._faiss.add(bank)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (distances [Q, k] true L2, indices [Q, k] int64), on the queries' device."""
        local = queries.to(self.device, torch.float32)
        indices = self.candidates(local, k)
        distances = exact_distances(local, self._bank, indices, rerank_block_bytes(self.device))
        return distances.to(queries.device), indices.to(queries.device)

    def candidates(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices [Q, k] of the k nearest, nearest first, on this index's device."""
        k = min(k, self.size)
        if self.kind == "torch":
            return self._torch_search(queries, k)
        _, idx = self._faiss.search(np.ascontiguousarray(queries.detach().cpu().numpy()), k)
        return torch.from_numpy(idx).to(self.device)

    def _torch_search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        rows = max(1, self._max_block_bytes // (4 * self.size))  # bound the [rows, M] distance block
        found = []
        for begin in range(0, len(queries), rows):
            block = queries[begin:begin + rows]
            # |b|^2 - 2 q.b ranks like the squared distance (|q|^2 is the same for the whole row)
            partial = self._bank_sq[None, :] - 2.0 * block @ self._bank.T
            found.append(torch.topk(partial, k, dim=1, largest=False).indices)
        return torch.cat(found) if found else queries.new_zeros((0, k), dtype=torch.int64)


def principal_subspace(bank: np.ndarray, dims: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], basis [D, r]) of the centred bank's leading principal directions: r = dims, or with
    dims 0 every direction with variance above 1e-10 of the largest (the numerical rank)."""
    bank = np.asarray(bank, dtype=np.float64)
    mean = bank.mean(0)
    centred = bank - mean
    variance, vectors = np.linalg.eigh(centred.T @ centred)  # ascending
    rank = int((variance > variance[-1] * 1e-10).sum()) if variance[-1] > 0 else 1
    keep = min(dims, rank) if dims else rank
    return mean, np.ascontiguousarray(vectors[:, ::-1][:, :keep])


class ShortlistIndex:
    """A cheap search for a shortlist of candidates, re-ranked exactly in float32: true L2 distances, and
    the exact k nearest among the candidates. Same interface as NearestNeighbourIndex."""

    def __init__(self, bank: np.ndarray, search: SearchConfig, kind: str = "auto",
                 device: torch.device | str = "cpu", max_block_bytes: int = 256 << 20):
        search = search.on(device, kind)
        if search.method == "exact":
            raise IndexError_("the exact search has no shortlist: use NearestNeighbourIndex (or make_index)")
        check_engine(search, kind)
        self.device = torch.device(device)
        self.search_config = search  # as it runs here: "auto" resolved (dims and lists as built, below)
        self.size, self.dim = bank.shape
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self._max_block_bytes = max_block_bytes
        self._bank = torch.from_numpy(bank).to(self.device)
        self._fallback: NearestNeighbourIndex | None = None
        if search.method == "half":
            self.kind, self.dims = "torch", self.dim
            # float16 products on CUDA; on the CPU bfloat16 (float16 matrix products are slow there)
            self._low = torch.float16 if self.device.type == "cuda" else torch.bfloat16
            self._mean = self._bank.mean(0)
            self._low_bank = (self._bank - self._mean).to(self._low)
            self._low_sq = self._low_bank.float().square().sum(1)  # of the rounded vectors, as the products see them
            return
        # subspace, ivf, hnsw: the coarse search runs in the bank's leading principal directions
        mean, basis = principal_subspace(bank, search.dims)
        self._mean = torch.from_numpy(mean.astype(np.float32)).to(self.device)
        self._basis = torch.from_numpy(basis.astype(np.float32)).to(self.device)
        self._offset = self._mean @ self._basis  # the mean's projection: (v - mean) @ basis = v @ basis - offset
        self.dims = basis.shape[1]  # capped by the bank's rank
        projected = np.ascontiguousarray(self._project(self._bank).cpu().numpy())
        lists = min(search.ivf_lists or max(1, int(2 * math.sqrt(self.size))), self.size)
        self.search_config = replace(search, dims=self.dims, **({"ivf_lists": lists} if search.method == "ivf" else {}))
        if search.method == "subspace":
            self._coarse = NearestNeighbourIndex(projected, kind, self.device)
            self.kind = self._coarse.kind
            return
        self.kind = "faiss-cpu"
        if faiss is None:
            raise IndexError_(f"search {search.method} needs faiss, which is not installed")
        if search.method == "ivf":
            self._faiss = _ivf(projected, lists)
            self._faiss.nprobe = min(search.ivf_probes, lists)
            # the cheap shortlist's own cells, over the first BOUND_DIMS of the same coordinates (upper_bounds)
            leading = np.ascontiguousarray(projected[:, :BOUND_DIMS])
            self._bound = _ivf(leading, lists)
            self._bound.add(leading)
        else:
            self._faiss = faiss.IndexHNSWFlat(self.dims, search.hnsw_links)
            self._faiss.hnsw.efSearch = search.hnsw_ef
        self._faiss.add(projected)

    def upper_bounds(self, queries: torch.Tensor, probes: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ivf only: queries [Q, D] -> (distances [Q], indices [Q] int64): for each query the nearest of `count`
        candidates from its `probes` nearest cells of the cheap shortlist (an ivf over the bank's first BOUND_DIMS
        principal coordinates), re-ranked exactly. Each distance is a true distance to a bank feature, so never
        below what any search reports for the query: an upper bound (scorer/bounded.py). A quarter of the full
        search's projection; a cell short of `count` features leaves -1s, re-ranked as bank feature 0 (a true
        distance still)."""
        if self.search_config.method != "ivf":
            raise IndexError_(f"the cheap shortlist is the ivf search's, not {self.search_config.method}'s")
        local = queries.to(self.device, torch.float32)
        dims = self._bound.d  # BOUND_DIMS, or fewer for a bank of lower rank
        coarse = (local @ self._basis[:, :dims]).sub_(self._offset[:dims])
        # the probes as a per-call parameter, never set on the index: scorers in other threads may share it
        params = faiss.SearchParametersIVF(nprobe=min(probes, self._bound.nlist))
        _, found = self._bound.search(np.ascontiguousarray(coarse.cpu().numpy()), min(count, self.size), params=params)
        candidates = torch.from_numpy(found).to(self.device).clamp_(min=0)
        distances, best = exact_distances(local, self._bank, candidates).min(dim=1)
        return distances.to(queries.device), candidates.gather(1, best[:, None])[:, 0].to(queries.device)

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [Q, D] -> their centred coordinates [Q, dims] in the principal directions. The mean comes off
        after the product (its projection, once): no centred copy of the queries (51 MB for a batch of 16 crops),
        which took ~40 % of the projection's time (2.3 -> 1.4 ms per image, macaroni1's bank, /tmp timing)."""
        return (vectors @ self._basis).sub_(self._offset)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (distances [Q, k] true L2, indices [Q, k] int64), on the queries' device."""
        k = min(k, self.size)
        local = queries.to(self.device, torch.float32)
        candidates = self.candidates(local, min(self.size, self.search_config.shortlist + k - 1))
        if self.search_config.method in ("ivf", "hnsw"):  # only FAISS's graph/cells can come back short (-1s);
            short = (candidates[:, :k] < 0).any(1)  # those rows are searched exactly (no device sync for the others)
            if bool(short.any()):
                candidates[short] = self._exact().candidates(local[short], candidates.shape[1])
        distances = exact_distances(local, self._bank, candidates, rerank_block_bytes(self.device))
        distances, order = torch.topk(distances, k, dim=1, largest=False)  # sorted, nearest first
        return distances.to(queries.device), candidates.gather(1, order).to(queries.device)

    def _exact(self) -> "NearestNeighbourIndex":
        """The flat exact search over the bank, built the first time a shortlist comes back short."""
        if self._fallback is None:
            self._fallback = NearestNeighbourIndex(self._bank.cpu().numpy(), "auto", self.device, self._max_block_bytes)
        return self._fallback

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Indices [Q, count] of the shortlist (-1 where the method found fewer), on this index's device."""
        if self.search_config.method == "half":
            return self._half_search(queries, count)
        projected = self._project(queries)
        if self.search_config.method == "subspace":
            return self._coarse.candidates(projected, count)
        _, idx = self._faiss.search(np.ascontiguousarray(projected.detach().cpu().numpy()), count)
        return torch.from_numpy(idx).to(self.device)

    def _half_search(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        low = (queries - self._mean).to(self._low)
        rows = max(1, self._max_block_bytes // (4 * self.size))
        found = []
        for begin in range(0, len(low), rows):
            products = (low[begin:begin + rows] @ self._low_bank.T).float()
            found.append(torch.topk(self._low_sq[None, :] - 2.0 * products, count, dim=1, largest=False).indices)
        return torch.cat(found) if found else queries.new_zeros((0, count), dtype=torch.int64)


def _ivf(points: np.ndarray, lists: int) -> "faiss.IndexIVFFlat":
    """A trained (empty) faiss IVF of `lists` k-means cells over points [N, d] (float32, C order)."""
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(points.shape[1]), points.shape[1], lists)
    index.cp.min_points_per_centroid = 1  # small banks: train anyway, without faiss's warning
    index.train(points)
    return index
