"""The classifier two-sample test on cases with a known answer (f2m_ray.evaluation.two_sample)."""

from __future__ import annotations

import numpy as np
import pytest

from f2m_ray.core.images import to_model_range
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.evaluation.two_sample import blur_calibrator, roc_auc, two_sample_auc


def test_roc_auc_counts_pairs_and_ties():
    assert roc_auc([0, 1, 2], [3, 4]) == 1.0
    assert roc_auc([3, 4], [0, 1, 2]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([0, 2], [1, 3]) == pytest.approx(0.75)  # (1 > 0) + (3 > 0) + (3 > 2) of 4 pairs
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=300), rng.normal(size=200) + 0.5
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(neg, pos) == pytest.approx(brute)


@pytest.fixture(scope="module")
def phantoms():
    rows = list(generate_phantoms(240, 5))
    return np.stack([to_model_range(image) for _, image, _ in rows])


def test_the_same_distribution_cannot_be_told_apart_and_a_template_always_can(phantoms):
    same = two_sample_auc(phantoms[:120], phantoms[120:], steps=150)
    assert (same.train_rows, same.test_rows, same.steps) == (60, 60, 150)
    assert 0.3 < same.auc < 0.7
    template = np.repeat(phantoms[:1], 120, axis=0)  # one mass, 120 times
    assert two_sample_auc(phantoms[120:], template, steps=150).auc > 0.95


def test_the_blur_calibrator_and_too_few_rows(phantoms):
    calibrated = blur_calibrator(phantoms, steps=150, sigma=2.0)
    assert calibrated.auc > 0.6 and calibrated.train_rows == 60  # a 2-px blur is visible to the test
    with pytest.raises(ValueError, match="at least 20 masses of each kind"):
        two_sample_auc(phantoms[:10], phantoms[10:30])
