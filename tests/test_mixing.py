from collections import Counter
from math import comb

import numpy as np
import pytest

from f2m_ray.core import mixing
from f2m_ray.errors import F2MError


def _draws(n=10_000, k=20, step=0.05, alpha=1.0, seed=3):
    return np.stack([mixing.quantized_dirichlet(mixing.sample_rng(seed, 1, i), k, step, alpha) for i in range(n)])


def test_weights_sum_to_one_on_the_grid():
    w = _draws()
    assert w.shape == (10_000, 20)
    assert np.all(np.abs(w.sum(axis=1) - 1.0) < 1e-9)
    assert np.all(w >= 0)
    units = w / 0.05
    assert np.all(np.abs(units - np.round(units)) < 1e-9)


def test_uniform_over_compositions_small_case():
    # K = 3 weights in quarters: C(4 + 2, 2) = 15 compositions, each with p = 1/15.
    w = _draws(n=15_000, k=3, step=0.25)
    counts = Counter(tuple(np.round(row * 4).astype(int)) for row in w)
    assert len(counts) == 15
    expected = 15_000 / 15
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 36.1  # chi-square, 14 dof, p = 0.001


def test_marginal_matches_uniform_compositions_k20():
    # Under uniform compositions of U = 20 into K = 20 parts, P(first part = c) = C(U - c + K - 2, K - 2) / C(U + K - 1, K - 1).
    w = _draws()
    first = np.round(w[:, 0] * 20).astype(int)
    total = comb(20 + 19, 19)
    for c in (0, 1, 2):
        p = comb(20 - c + 18, 18) / total
        observed = np.mean(first == c)
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / len(first)), (c, observed, p)


def test_concentration_changes_spread():
    flat = _draws(n=2000, alpha=1.0)
    even = _draws(n=2000, alpha=50.0)
    sparse = _draws(n=2000, alpha=0.1)
    assert (even > 0).sum(axis=1).mean() > (flat > 0).sum(axis=1).mean() > (sparse > 0).sum(axis=1).mean()


def test_plan_is_a_pure_function_of_seed_category_index():
    a = mixing.plan_sample(7, 3, 123, pool_size=104)
    b = mixing.plan_sample(7, 3, 123, pool_size=104)
    np.testing.assert_array_equal(a.seed_positions, b.seed_positions)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert len(set(a.seed_positions.tolist())) == 20
    assert np.all(np.diff(a.weights) <= 0)  # largest weight first
    others = [mixing.plan_sample(7, 3, 124, 104), mixing.plan_sample(8, 3, 123, 104), mixing.plan_sample(7, 4, 123, 104)]
    for other in others:
        assert not np.array_equal(a.seed_positions, other.seed_positions)


def test_small_pool_uses_all_seeds_and_tiny_pool_refused():
    plan = mixing.plan_sample(0, 0, 0, pool_size=5, k=20)
    assert sorted(plan.seed_positions.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(F2MError, match="pool has 1"):
        mixing.plan_sample(0, 0, 0, pool_size=1)


def test_mix_is_convex_combination():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(mixing.mix(features, [0.5, 0.25, 0.25]), [1.0, 0.75])
    np.testing.assert_allclose(mixing.mix(features, [[1, 0, 0], [0, 0, 1]]), [[1, 0], [2, 2]])
    with pytest.raises(F2MError, match="sum to 1"):
        mixing.mix(features, [0.5, 0.5, 0.5])


def test_variance_preserving_mix_of_one_hot_returns_the_seed():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 5, 16)).astype(np.float32)  # (b, K, D)
    centroid = rng.normal(size=16)
    weights = np.zeros((3, 5))
    weights[0, 2] = weights[1, 0] = weights[2, 4] = 1.0
    out = mixing.mix_rows(features, weights, centroid)
    np.testing.assert_array_equal(out, features[[0, 1, 2], [2, 0, 4]])
    # the convex mix agrees on one-hot weights; they differ otherwise
    np.testing.assert_array_equal(mixing.mix_rows(features, weights), out)
    even = np.full((3, 5), 0.2)
    assert not np.allclose(mixing.mix_rows(features, even, centroid), mixing.mix_rows(features, even))


def test_variance_preserving_mix_keeps_the_spread_of_single_features():
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(200, 32))  # deviations of unit variance around the origin
    centroid = pool.mean(axis=0)
    plans = [mixing.plan_sample(0, 3, i, len(pool)) for i in range(500)]
    rows = np.stack([pool[p.seed_positions] for p in plans])
    weights = np.stack([p.weights for p in plans])
    single = pool.std(axis=0).mean()
    convex = mixing.mix_rows(rows, weights).std(axis=0).mean()
    preserving = mixing.mix_rows(rows, weights, centroid).std(axis=0).mean()
    assert 0.25 < convex / single < 0.4  # about sqrt(2 / (K + 1)) = 0.31 for K = 20
    assert 0.9 < preserving / single < 1.1


@pytest.mark.parametrize("name", list(mixing.SCHEMES))
def test_every_scheme_plans_weights_on_the_grid(name):
    s = mixing.scheme(name)
    for i in range(200):
        plan = mixing.plan_sample(5, 2, i, 40, s.k, 0.05, s.alpha)
        assert len(plan.weights) == s.k == len(set(plan.seed_positions.tolist()))
        assert abs(plan.weights.sum() - 1.0) < 1e-12 and np.all(plan.weights >= 0)
        np.testing.assert_allclose(plan.weights * 20, np.round(plan.weights * 20), atol=1e-12)


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(F2MError, match="unknown mixing scheme 'convex'; choose one of paper, variance-preserving, sparse"):
        mixing.scheme("convex")


def test_line_and_barycentric_grids():
    line = mixing.line_weights(10)
    assert line.shape == (10, 2)
    np.testing.assert_allclose(line[0], [1, 0])
    np.testing.assert_allclose(line[-1], [0, 1])
    np.testing.assert_allclose(np.diff(line[:, 1]), 1 / 9)  # equidistant
    tri = mixing.barycentric_grid(5)
    assert tri.shape == (15, 3)
    np.testing.assert_allclose(tri.sum(axis=1), 1.0)
    for corner in np.eye(3):
        assert any(np.allclose(row, corner) for row in tri)
    assert len({tuple(np.round(r, 9)) for r in tri}) == 15


@pytest.mark.parametrize("step", [0.0, 0.3, 1.5])
def test_bad_step_refused(step):
    with pytest.raises(F2MError):
        mixing.grid_units(step)


@pytest.mark.parametrize("pool_size", [10, 40])
def test_variance_preserving_mix_keeps_the_spread_of_a_small_pool(pool_size):
    """K = 20 of a pool of N (all N when N < 20) around the pool's own mean: the finite-pool factor keeps the spread."""
    rng = np.random.default_rng(pool_size)
    spreads = {"corrected": [], "plain": []}
    single = []
    for trial in range(40):  # many pools: the spread of one pool's 10 seeds is itself noisy
        pool = rng.normal(size=(pool_size, 16))
        centroid = pool.mean(axis=0)
        plans = [mixing.plan_sample(trial, 3, i, pool_size) for i in range(200)]
        rows = np.stack([pool[p.seed_positions] for p in plans])
        weights = np.stack([p.weights for p in plans])
        single.append(pool.var(axis=0, ddof=1).mean())
        spreads["corrected"].append(mixing.mix_rows(rows, weights, centroid, pool_size).var(axis=0).mean())
        spreads["plain"].append(mixing.mix_rows(rows, weights, centroid).var(axis=0).mean())
    ratio = {k: np.sqrt(np.mean(v) / np.mean(single)) for k, v in spreads.items()}
    assert 0.93 < ratio["corrected"] < 1.07, ratio
    if pool_size == 10:  # every sample mixes the whole pool: 1/||w|| alone keeps about 0.67
        assert ratio["plain"] < 0.8, ratio


def test_variance_preserving_scale_edge_cases():
    one_hot = np.eye(4)[[0, 2]]
    np.testing.assert_allclose(mixing.variance_preserving_scale(one_hot, 10), [1.0, 1.0])
    uniform = np.full((1, 4), 0.25)  # uniform weight on the whole pool of 4: the mix is the centroid
    assert mixing.variance_preserving_scale(uniform, 4).tolist() == [1.0]
    np.testing.assert_allclose(mixing.variance_preserving_scale(uniform), [2.0])  # 1 / ||w||_2
    with pytest.raises(F2MError, match="pool of at least 2 seeds"):
        mixing.variance_preserving_scale(one_hot, 1)
