"""Nearest-neighbour search against brute force in numpy; all kinds report true L2 distances."""
import numpy as np
import pytest
import torch

from scorer.index import IndexError_, NearestNeighbourIndex


@pytest.mark.parametrize("kind", ["faiss-cpu", "torch", "auto"])
def test_search_matches_brute_force(kind):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 64)).astype(np.float32)
    queries = rng.normal(size=(300, 64)).astype(np.float32)
    index = NearestNeighbourIndex(bank, kind, "cpu", max_block_bytes=4 * 500 * 37)  # forces several blocks
    distances, indices = index.search(torch.from_numpy(queries), k=3)
    full = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    expected_idx = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(indices.numpy(), expected_idx)
    np.testing.assert_allclose(distances.numpy(), np.take_along_axis(full, expected_idx, 1), rtol=1e-5)


def test_k_is_capped_at_the_bank_size():
    index = NearestNeighbourIndex(np.eye(3, dtype=np.float32), "torch")
    distances, indices = index.search(torch.zeros(1, 3), k=9)
    assert distances.shape == (1, 3)
    np.testing.assert_allclose(distances.numpy(), np.ones((1, 3)), rtol=1e-6)


def test_faiss_gpu_without_gpu_is_a_clear_error():
    with pytest.raises(IndexError_, match="no GPU support|unknown"):
        NearestNeighbourIndex(np.eye(3, dtype=np.float32), "faiss-gpu", "cpu")
    with pytest.raises(IndexError_, match="unknown index kind"):
        NearestNeighbourIndex(np.eye(3, dtype=np.float32), "hnsw", "cpu")


def test_all_kinds_report_the_same_distance_for_the_same_neighbour():
    rng = np.random.default_rng(1)
    bank = (rng.normal(size=(2000, 256)) + 30.0).astype(np.float32)  # large norms: cancellation-prone
    queries = torch.from_numpy(bank[:300] + rng.normal(0, 0.05, (300, 256)).astype(np.float32))
    d_faiss, i_faiss = NearestNeighbourIndex(bank, "faiss-cpu").search(queries)
    d_torch, i_torch = NearestNeighbourIndex(bank, "torch").search(queries)
    assert torch.equal(i_faiss, i_torch)
    assert torch.equal(d_faiss, d_torch)
    exact = np.linalg.norm(queries.numpy().astype(np.float64) - bank[i_faiss[:, 0].numpy()], axis=1)
    np.testing.assert_allclose(d_faiss[:, 0].numpy(), exact, rtol=1e-5)


def test_fused_and_blocked_re_ranking_give_the_true_distances():
    """exact_distances (on the CPU: faiss's fused pass when faiss is there) and the blocked torch path both give
    |q - b| of float64 to float rounding, and inf where a candidate is missing (-1)."""
    from scorer.index import blocked_distances, exact_distances

    rng = np.random.default_rng(2)
    bank = (rng.normal(size=(700, 96)) + 5.0).astype(np.float32)
    queries = rng.normal(size=(120, 96)).astype(np.float32) + 5.0
    ids = rng.integers(0, 700, size=(120, 9))
    ids[::7, -2:] = -1
    expected = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[np.clip(ids, 0, None)], axis=2)
    expected[ids < 0] = np.inf
    args = (torch.from_numpy(queries), torch.from_numpy(bank), torch.from_numpy(ids))
    for got in (exact_distances(*args), blocked_distances(*args, max_block_bytes=4 * 96 * 9 * 11)):
        assert got.dtype == torch.float32 and got.shape == (120, 9)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
