"""Metrics on constructed feature sets whose answers are known."""

import numpy as np
import pytest

from f2m_ray.core import metrics


def gaussian(n, mean, std, seed):
    rng = np.random.default_rng(seed)
    mean = np.asarray(mean, dtype=np.float64)
    return mean + rng.standard_normal((n, len(mean))) * np.asarray(std, dtype=np.float64)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_of_identical_sets_is_zero():
    x = gaussian(500, np.zeros(16), 1.0, seed=0)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_one_dimension():
    # N(1, 2^2) vs N(4, 3^2): (1 - 4)^2 + (2 - 3)^2 = 10
    fd = metrics.frechet_distance_from_statistics(np.array([1.0]), np.array([[4.0]]), np.array([4.0]), np.array([[9.0]]))
    assert fd == pytest.approx(10.0)


def test_frechet_closed_form_rotated_diagonal_covariances():
    # Diagonal covariances a, b under one rotation Q: FD = |dm|^2 + sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 4.0, 1.0, 1.0])
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    fd = metrics.frechet_distance_from_statistics(np.zeros(4), q @ np.diag(a) @ q.T, shift, q @ np.diag(b) @ q.T)
    expected = shift @ shift + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5.25 + 1 + 0 + 4 + 0.25 = 10.5
    assert expected == pytest.approx(10.5)
    assert fd == pytest.approx(expected, rel=1e-9)


def test_frechet_of_shifted_gaussian_samples():
    # N(0, I) vs N(shift, 4 I) in 4-D: |shift|^2 + 4 * (2 - 1)^2 = 9 + 4 = 13
    shift = np.array([2.0, 2.0, 1.0, 0.0])
    x = gaussian(40_000, np.zeros(4), 1.0, seed=2)
    y = gaussian(40_000, shift, 2.0, seed=3)
    assert metrics.frechet_distance(x, y) == pytest.approx(13.0, rel=0.03)
    # Same covariance: the trace term vanishes and only the squared mean shift remains.
    assert metrics.frechet_distance(x, x + shift) == pytest.approx(9.0, rel=1e-9)


def test_frechet_of_singular_covariances_is_finite():
    # Fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative value.
    x, y = gaussian(5, np.zeros(32), 1.0, seed=4), gaussian(5, np.ones(32), 1.0, seed=5)
    fd = metrics.frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 20.0  # the mean term alone is about 32


# ---------------------------------------------------------------- neighbours, precision and recall


def test_nearest_distances_and_chunking():
    references = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    queries = np.array([[1.0, 0.0], [9.0, 0.0], [0.0, 4.0], [3.0, 5.0], [0.0, 0.0]])
    distances, indices = metrics.nearest_distances(queries, references, chunk=2)
    np.testing.assert_allclose(distances, [1.0, 1.0, 1.0, 3.0, 0.0])
    np.testing.assert_array_equal(indices, [0, 1, 2, 2, 0])
    big_q, big_r = gaussian(300, np.zeros(8), 1.0, 6), gaussian(70, np.zeros(8), 1.0, 7)
    np.testing.assert_allclose(metrics.nearest_distances(big_q, big_r, chunk=7)[0],
                               metrics.nearest_distances(big_q, big_r)[0])


def test_nearest_rms_pixel_distances():
    references = np.zeros((3, 4, 4))
    references[1] += 0.5
    references[2, :2] = 1.0  # half the pixels at 1
    images = np.stack([references[1], np.full((4, 4), 0.6), np.ones((4, 4))])
    distances = metrics.nearest_rms_pixel_distances(images, references, chunk=2)
    # copy -> 0; 0.6 everywhere is 0.1 from the 0.5 image; ones are 0.5 from it, nearer than the
    # half-ones image (sqrt(8 / 16) = 0.71)
    np.testing.assert_allclose(distances, [0.0, 0.1, 0.5], atol=1e-7)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.nearest_rms_pixel_distances(images[:, :2], references)


def test_kth_neighbour_radii_on_a_line():
    points = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(metrics.kth_neighbour_radii(points, 1, chunk=3), [1.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(metrics.kth_neighbour_radii(points, 2), [3.0, 2.0, 3.0, 5.0])
    with pytest.raises(ValueError, match="k must be"):
        metrics.kth_neighbour_radii(points, 4)


def test_precision_recall_identical_sets_is_one():
    x = gaussian(400, np.zeros(10), 1.0, seed=8)
    result = metrics.precision_recall(x, x.copy(), k=3)
    assert (result.precision, result.recall, result.k) == (1.0, 1.0, 3)


def test_precision_recall_same_distribution_is_high():
    result = metrics.precision_recall(gaussian(1000, np.zeros(4), 1.0, 9), gaussian(1000, np.zeros(4), 1.0, 10), k=5)
    assert result.precision > 0.9 and result.recall > 0.9


def test_precision_recall_disjoint_sets_is_zero():
    real = gaussian(300, np.zeros(6), 1.0, seed=11)
    synthetic = gaussian(300, np.full(6, 100.0), 1.0, seed=12)
    result = metrics.precision_recall(real, synthetic, k=3)
    assert (result.precision, result.recall) == (0.0, 0.0)


def test_precision_recall_half_off_manifold():
    # Half the synthetic set copies real samples, half sits far away: precision 0.5, and every
    # real sample is covered by its copy (recall 1).
    real = gaussian(200, np.zeros(6), 1.0, seed=13)
    synthetic = np.concatenate([real, gaussian(200, np.full(6, 50.0), 1.0, seed=14)])
    result = metrics.precision_recall(real, synthetic, k=3)
    assert (result.precision, result.recall) == (0.5, 1.0)
    # Mode dropping: a synthetic set covering only one of two real clusters has recall about 0.5.
    two_clusters = np.concatenate([gaussian(200, np.zeros(6), 1.0, 15), gaussian(200, np.full(6, 30.0), 1.0, 16)])
    one_cluster = gaussian(400, np.zeros(6), 1.0, 17)
    dropped = metrics.precision_recall(two_clusters, one_cluster, k=3)
    assert dropped.precision > 0.75 and 0.4 < dropped.recall < 0.55


# ---------------------------------------------------------------- diversity


def test_diversity_known_values():
    assert metrics.diversity(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert metrics.diversity(np.array([[0.0], [1.0], [2.0]])) == pytest.approx(4.0 / 3.0)  # pairs 1, 2, 1
    assert metrics.diversity(np.zeros((10, 3))) == 0.0


def test_diversity_subsample_is_deterministic_and_close():
    x = gaussian(3000, np.zeros(5), 1.0, seed=18)
    full = metrics.diversity(x, max_samples=3000)
    sub = metrics.diversity(x, max_samples=500, seed=1)
    assert sub == metrics.diversity(x, max_samples=500, seed=1)
    assert sub == pytest.approx(full, rel=0.03)
    # E|x - y| for x, y ~ N(0, I_5): sqrt(2) * E chi_5 = sqrt(2) * 2.1277 = 3.009
    assert full == pytest.approx(3.009, rel=0.02)


def test_subsample_indices():
    np.testing.assert_array_equal(metrics.subsample_indices(5, 10, 0), np.arange(5))
    picked = metrics.subsample_indices(100, 10, 3)
    assert len(picked) == 10 and len(set(picked.tolist())) == 10 and (np.diff(picked) > 0).all()
    np.testing.assert_array_equal(picked, metrics.subsample_indices(100, 10, 3))


# ---------------------------------------------------------------- memorization


def test_exact_copies_of_training_seeds_are_100_percent_memorized():
    training = gaussian(500, np.zeros(16), 1.0, seed=19)
    heldout = gaussian(200, np.zeros(16), 1.0, seed=20)
    copies = training[np.random.default_rng(0).integers(0, 500, size=300)]
    result = metrics.memorization(metrics.nearest_distances(copies, training)[0],
                                  metrics.nearest_distances(heldout, training)[0])
    assert result.share == 1.0 and result.flagged.sum() == 300
    assert result.threshold > 0.0 and result.percentile == 1.0


def test_fresh_samples_are_rarely_memorized():
    training = gaussian(500, np.zeros(16), 1.0, seed=21)
    heldout = gaussian(1000, np.zeros(16), 1.0, seed=22)
    fresh = gaussian(2000, np.zeros(16), 1.0, seed=23)
    result = metrics.memorization(metrics.nearest_distances(fresh, training)[0],
                                  metrics.nearest_distances(heldout, training)[0])
    assert result.share < 0.04  # about 1% by construction of the threshold


def test_memorization_threshold_and_share():
    heldout = np.arange(1.0, 101.0)  # 1st percentile (linear interpolation) = 1.99
    result = metrics.memorization(np.array([0.5, 1.5, 2.5, 50.0]), heldout)
    assert result.threshold == pytest.approx(1.99)
    assert result.share == 0.5
    np.testing.assert_array_equal(result.flagged, [True, True, False, False])
    with pytest.raises(ValueError, match="held-out"):
        metrics.memorization(np.array([1.0]), np.array([]))


# ---------------------------------------------------------------- accuracies


def test_head_accuracies():
    out = metrics.head_accuracies(np.array([0, 1, 2, 3]), np.array([1, 1, 1, 1]),
                                  np.array([0, 1, 0, 0]), np.array([1, 0, 1, 1]))
    assert out == {"margin": 0.5, "shape": 0.75, "mean": 0.625, "both": 0.25}
    assert np.isnan(metrics.accuracy(np.array([]), np.array([])))
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy(np.array([1, 2]), np.array([1]))


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_precision_recall_density_coverage_match_the_authors_prdc(shift):
    import prdc  # test extra: the authors' reference implementation
    rng = np.random.default_rng(int(shift * 10))
    real = rng.normal(size=(300, 8))
    synthetic = rng.normal(size=(250, 8)) * 0.6 + shift  # narrower and shifted: every figure below 1
    want = prdc.compute_prdc(real, synthetic, nearest_k=5)
    pr = metrics.precision_recall(real, synthetic, k=5, chunk=64)
    dc = metrics.density_coverage(real, synthetic, k=5, chunk=64)
    assert pr.precision == pytest.approx(want["precision"], abs=1e-12)
    assert pr.recall == pytest.approx(want["recall"], abs=1e-12)
    assert dc.density == pytest.approx(want["density"], abs=1e-12)
    assert dc.coverage == pytest.approx(want["coverage"], abs=1e-12)
    if shift == 3.0:
        assert dc.coverage < 0.05 and dc.density < 0.05
    if shift == 0.0:
        assert dc.density > 1.5  # narrower than real: denser than real in the real balls


def test_density_coverage_of_a_set_against_itself():
    x = np.random.default_rng(0).normal(size=(200, 4))
    dc = metrics.density_coverage(x, x, k=5)
    # each ball strictly holds its centre and its k - 1 nearest others (the k-th sits on the border)
    assert dc.coverage == 1.0 and dc.k == 5 and dc.density == 1.0
