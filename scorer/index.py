"""Nearest-neighbour search over the memory bank. Every kind returns true (not squared) L2 distances.

The search finds the neighbours with the fast |q|^2 + |b|^2 - 2 q.b expansion; the distances it
reports are then recomputed as |q - b| for those neighbours, so every kind reports the same value
for the same neighbour (the expansion alone loses digits to cancellation, ~1e-3 relative).

- "faiss-cpu": FAISS IndexFlatL2 on the CPU.
- "faiss-gpu": FAISS GpuIndexFlatL2 on the scorer's CUDA device, when faiss is built with GPU support.
- "torch": batched matrix-product search with torch, on any device (the CUDA path without faiss-gpu).
- "auto": faiss-gpu if possible on CUDA, else torch on CUDA, else faiss-cpu.
"""
from __future__ import annotations

import numpy as np
import torch

try:  # faiss-cpu or faiss-gpu, whichever the host has; without either, the torch search serves
    import faiss
except ImportError:  # pragma: no cover - both packages are optional at import time
    faiss = None

INDEX_KINDS = ("auto", "faiss-cpu", "faiss-gpu", "torch")


class IndexError_(RuntimeError):
    pass


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


class NearestNeighbourIndex:
    """Exact k-NN over a fixed bank [M, D] (float32)."""

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
        k = min(k, self.size)
        local = queries.to(self.device, torch.float32)
        if self.kind == "torch":
            indices = self._torch_search(local, k)
        else:
            _, idx = self._faiss.search(np.ascontiguousarray(local.detach().cpu().numpy()), k)
            indices = torch.from_numpy(idx).to(self.device)
        distances = self._exact_distances(local, indices)
        return distances.to(queries.device), indices.to(queries.device)

    def _exact_distances(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows = max(1, self._max_block_bytes // (4 * self.dim * indices.shape[1]))
        return torch.cat([torch.linalg.vector_norm(queries[b:b + rows, None, :] - self._bank[indices[b:b + rows]], dim=2)
                          for b in range(0, len(queries), rows)]) if len(queries) else queries.new_zeros(indices.shape)

    def _torch_search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        rows = max(1, self._max_block_bytes // (4 * self.size))  # bound the [rows, M] distance block
        found = []
        for begin in range(0, len(queries), rows):
            block = queries[begin:begin + rows]
            # |b|^2 - 2 q.b ranks like the squared distance (|q|^2 is the same for the whole row)
            partial = self._bank_sq[None, :] - 2.0 * block @ self._bank.T
            found.append(torch.topk(partial, k, dim=1, largest=False).indices)
        return torch.cat(found) if found else queries.new_zeros((0, k), dtype=torch.int64)
