"""The bound-and-check search finds exactly the nearest reference image that comparing every pair finds."""

from __future__ import annotations

import numpy as np
import pytest

from f2m_ray.core import metrics
from f2m_ray.core.images import to_model_range
from f2m_ray.core.nearest import NearestImage
from f2m_ray.data.phantom import generate_phantoms


def _brute_force(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    diff = images.reshape(len(images), 1, -1).astype(np.int64) - references.reshape(1, len(references), -1)
    return (diff * diff).sum(axis=2).min(axis=1).astype(np.float64)


def _phantoms(n: int, seed: int) -> np.ndarray:
    return np.stack([image for _, image, _ in generate_phantoms(n, seed)])  # (n, 64, 64) uint8


def test_phantoms_against_phantoms_match_every_pair_compared():
    references, queries = _phantoms(300, 0), _phantoms(70, 1000)
    queries[3] = references[17]  # an exact copy: distance 0
    nearest = NearestImage(references)
    got = nearest.squared_distances(queries)
    expected = _brute_force(queries, references)
    assert got.dtype == np.float64 and got.shape == (70,)
    assert np.array_equal(got, expected)
    assert got[3] == 0.0 and (got[np.arange(70) != 3] > 0).all()


def test_noise_that_defeats_the_bound_still_gives_the_exact_answer():
    """Uniform noise: block sums say little, so most pairs are checked (in several chunks)."""
    rng = np.random.default_rng(0)
    references = rng.integers(0, 256, (400, 64, 64), dtype=np.uint8)
    queries = rng.integers(0, 256, (40, 64, 64), dtype=np.uint8)
    assert np.array_equal(NearestImage(references).squared_distances(queries), _brute_force(queries, references))


def test_rms_is_the_evaluation_measure_in_model_units():
    references, queries = _phantoms(50, 0), _phantoms(20, 500)
    got = NearestImage(references).rms(queries)
    expected = metrics.nearest_rms_pixel_distances(to_model_range(queries), to_model_range(references))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_the_answer_does_not_depend_on_batch_or_order():
    references, queries = _phantoms(200, 0), _phantoms(64, 300)
    nearest = NearestImage(references)
    whole = nearest.squared_distances(queries)
    parts = np.concatenate([nearest.squared_distances(queries[i:i + 7]) for i in range(0, 64, 7)])
    reversed_ = nearest.squared_distances(queries[::-1])[::-1]
    assert np.array_equal(whole, parts) and np.array_equal(whole, reversed_)
    assert len(nearest.squared_distances(queries[:0])) == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        NearestImage(np.zeros((0, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiples of 4"):
        NearestImage(np.zeros((3, 62, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        NearestImage(np.zeros((3, 64, 64), dtype=np.uint8)).squared_distances(np.zeros((2, 32, 32), dtype=np.uint8))
