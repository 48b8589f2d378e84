"""Carlini's tiled-L2 clique criterion and Wen's score, on constructed tensors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.audit.criteria import carlini_flag, max_clique, near_identical_graph, tiled_l2, tiles
from pipeline.audit.prescreen import wen_norms, wen_score


def test_tiles_cut_each_image_into_a_grid_in_row_major_order():
    img = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    t = tiles(img, 2)
    assert t.shape == (1, 4, 4)
    assert t[0, 0].tolist() == [0, 1, 4, 5] and t[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="cannot be cut"):
        tiles(torch.zeros(1, 3, 2, 2), 4)


def test_tiled_l2_is_the_worst_tile_rms_difference():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[:, :, :2, :2] = 1.0  # one 2x2 corner changed: a quarter of the top-left 4x4 tile
    d = tiled_l2(torch.cat([a, b]), grid=2)
    assert d.shape == (2, 2) and d[0, 0] == 0 and d[1, 1] == 0
    assert d[0, 1] == pytest.approx(np.sqrt(0.25)) and d[1, 0] == pytest.approx(d[0, 1])
    # The plain (untiled) RMS difference is 4 times smaller: a single differing region dominates when tiled.
    assert tiled_l2(torch.cat([a, b]), grid=1)[0, 1] == pytest.approx(np.sqrt(4 / 64))


def test_tiled_l2_reads_images_in_minus_one_to_one_like_zero_to_one():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert np.allclose(tiled_l2(x * 2 - 1), tiled_l2(x))
    other = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert tiled_l2(x, others=other).shape == (3, 2)


def _brute_force_max_clique(adj: np.ndarray) -> int:
    n = len(adj)
    for size in range(n, 0, -1):
        for subset in itertools.combinations(range(n), size):
            if all(adj[i, j] for i, j in itertools.combinations(subset, 2)):
                return size
    return 0


def test_max_clique_is_exact_on_random_graphs():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 11))
        upper = np.triu(rng.random((n, n)) < rng.uniform(0.2, 0.9), 1)
        adj = upper | upper.T
        clique = max_clique(adj)
        assert len(clique) == _brute_force_max_clique(adj), trial
        assert all(adj[i, j] for i, j in itertools.combinations(clique, 2))


def test_max_clique_finds_a_planted_block():
    rng = np.random.default_rng(1)
    n = 60
    upper = np.triu(rng.random((n, n)) < 0.1, 1)
    adj = upper | upper.T
    block = sorted(rng.choice(n, 15, replace=False).tolist())
    for i, j in itertools.combinations(block, 2):
        adj[i, j] = adj[j, i] = True
    assert len(max_clique(adj)) >= 15
    assert max_clique(np.zeros((0, 0), dtype=bool)) == []


def test_carlini_flags_seeds_that_agree_and_not_diverse_ones():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 32, 32, generator=gen)
    copies = (base + 0.02 * torch.randn(6, 3, 32, 32, generator=gen)).clamp(0, 1)
    diverse = torch.rand(6, 3, 32, 32, generator=gen)
    flagged = carlini_flag(copies, grid=4, threshold=0.15, clique_size=10)
    assert flagged.flagged and flagged.clique == list(range(6)) and flagged.required == 6
    assert flagged.median_distance < 0.05
    clean = carlini_flag(diverse, grid=4, threshold=0.15, clique_size=10)
    assert not clean.flagged and len(clean.clique) == 1
    # Half copies, half diverse: a clique of 4 among 8 flags at clique_size 4, not at 5.
    mixed = torch.cat([copies[:4], diverse[:4]])
    assert carlini_flag(mixed, clique_size=4).flagged and not carlini_flag(mixed, clique_size=5).flagged
    # One copy that differs in a single tile breaks its edges even though its overall RMS is small.
    odd = copies[:3].clone()
    odd[2, :, :8, :8] = 1 - odd[2, :, :8, :8]
    result = carlini_flag(odd, clique_size=3)
    assert not result.flagged and len(result.clique) == 2
    assert not carlini_flag(copies[:1]).flagged


def test_near_identical_graph_is_symmetric_without_self_loops():
    d = np.array([[0.0, 0.1, 0.3], [0.1, 0.0, 0.05], [0.3, 0.2, 0.0]])
    adj = near_identical_graph(d, 0.15)
    assert adj.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_wen_norms_and_score():
    cond = torch.zeros(2, 4, 8, 8)
    uncond = torch.zeros(2, 4, 8, 8)
    cond[0, 0, 0, :3] = torch.tensor([1.0, 2.0, 2.0])  # norm 3
    norms = wen_norms(cond, uncond)
    assert norms.tolist() == [3.0, 0.0]
    assert wen_score([norms, torch.tensor([1.0, 2.0])]) == pytest.approx((3 + 0 + 1 + 2) / 4)
    with pytest.raises(ValueError):
        wen_norms(cond, uncond[:1])
    with pytest.raises(ValueError):
        wen_score(torch.zeros(0))
