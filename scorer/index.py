"""Nearest-neighbour search over the memory bank. Every kind returns true (not squared) L2 distances.

- "faiss-cpu": FAISS IndexFlatL2 on the CPU.
- "faiss-gpu": FAISS GpuIndexFlatL2 on the scorer's CUDA device, when faiss is built with GPU support.
- "torch": batched matrix-product search with torch, on any device (the CUDA path without faiss-gpu).
- "auto": faiss-gpu if possible on CUDA, else torch on CUDA, else faiss-cpu.
"""
from __future__ import annotations

import numpy as np
import torch

import faiss

INDEX_KINDS = ("auto", "faiss-cpu", "faiss-gpu", "torch")


class IndexError_(RuntimeError):
    pass


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_kind(kind: str, device: torch.device) -> str:
    if kind not in INDEX_KINDS:
        raise IndexError_(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss-cpu"


class NearestNeighbourIndex:
    """Exact k-NN over a fixed bank [M, D] (float32)."""

    def __init__(self, bank: np.ndarray, kind: str = "auto", device: torch.device | str = "cpu",
                 max_block_bytes: int = 256 << 20):
        self.device = torch.device(device)
        self.kind = resolve_kind(kind, self.device)
        self.size, self.dim = bank.shape
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self._max_block_bytes = max_block_bytes
        if self.kind == "torch":
            self._bank = torch.from_numpy(bank).to(self.device)
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
            self._faiss = faiss.IndexFlatL2(self.dim)
            self._faiss.add(bank)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (distances [Q, k] true L2, indices [Q, k] int64), on the queries' device."""
        k = min(k, self.size)
        if self.kind == "torch":
            distances, indices = self._torch_search(queries.to(self.device, torch.float32), k)
        else:
            sq, idx = self._faiss.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
            distances, indices = torch.from_numpy(sq).clamp_min_(0).sqrt_(), torch.from_numpy(idx)
        return distances.to(queries.device), indices.to(queries.device)

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = max(1, self._max_block_bytes // (4 * self.size))  # bound the [rows, M] distance block
        out_d, out_i = [], []
        for begin in range(0, len(queries), rows):
            block = queries[begin:begin + rows]
            sq = (block * block).sum(1, keepdim=True) + self._bank_sq[None, :] - 2.0 * block @ self._bank.T
            values, indices = torch.topk(sq, k, dim=1, largest=False)
            out_d.append(values.clamp_min_(0).sqrt_())
            out_i.append(indices)
        return torch.cat(out_d), torch.cat(out_i)
