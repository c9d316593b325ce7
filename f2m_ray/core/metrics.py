"""Quality metrics on feature sets: pure numpy, no Ray, no I/O, no torch.

Every function takes feature matrices (N, D) (rows are samples) and returns plain
floats or arrays, so that `evaluate` can compute them per category and overall, and
tests can check them on sets whose answers are known.

    frechet_distance       ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)
    precision_recall       k-NN manifolds (Kynkaanniemi et al., NeurIPS 2019)
    diversity              mean pairwise distance (deterministic subsample for large sets)
    nearest_distances      distance of each query to its nearest reference (chunked)
    nearest_rms_pixel_distances  the same on images, as RMS pixel difference
    memorization           share of synthetic samples closer to a training sample than the
                           1st percentile of held-out-real-to-training distances
    head_accuracies        accuracy per classifier head (margin, shape) and their mean

Distances are Euclidean and computed in float64 blocks of `chunk` query rows, so that
10,000 x 2,000 (or 10,000 x 10,000) pairs never materialise at once: one block of
1,024 x 10,000 float64 is 80 MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

DEFAULT_CHUNK = 1024  # query rows per distance block
DIVERSITY_MAX_SAMPLES = 2000  # pairs of at most this many samples: 2 million distances


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {x.shape}")
    return x


def _distance_blocks(queries: np.ndarray, references: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start row, (rows, M) Euclidean distances) for blocks of query rows."""
    ref_sq = np.einsum("ij,ij->i", references, references)  # (M,)
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]  # (b, D)
        sq = np.einsum("ij,ij->i", block, block)[:, None] + ref_sq[None, :] - 2.0 * block @ references.T  # (b, M)
        # |a|^2 + |b|^2 - 2ab cancels badly for near-identical rows: clip tiny negatives to zero.
        np.maximum(sq, 0.0, out=sq)
        yield start, np.sqrt(sq, out=sq)


def nearest_distances(
    queries: np.ndarray, references: np.ndarray, chunk: int = DEFAULT_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest reference row, its index) for every query row: (N,), (N,)."""
    queries = _as_features(queries, "queries")
    references = _as_features(references, "references")
    if len(references) == 0:
        raise ValueError("nearest_distances needs at least one reference row")
    distances = np.empty(len(queries))
    indices = np.empty(len(queries), dtype=np.int64)
    for start, block in _distance_blocks(queries, references, chunk):
        nearest = block.argmin(axis=1)
        indices[start : start + len(block)] = nearest
        distances[start : start + len(block)] = block[np.arange(len(block)), nearest]
    return distances, indices


def nearest_rms_pixel_distances(images: np.ndarray, references: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """RMS pixel difference of each image to its nearest reference image: (N,).

    images (N, H, W) and references (M, H, W) in the same units (f2m-ray's [-1, 1]); the
    result is L2 / sqrt(H * W): 0 for an exact copy, about 0.1 for two phantoms' backgrounds.
    Needs no model, so synthesis can store it for every mass and evaluate reads it the same way.
    """
    images, references = np.asarray(images), np.asarray(references)
    if images.shape[1:] != references.shape[1:]:
        raise ValueError(f"images {images.shape[1:]} and references {references.shape[1:]} differ in size")
    pixels = int(np.prod(images.shape[1:]))
    distances, _ = nearest_distances(images.reshape(len(images), pixels), references.reshape(len(references), pixels), chunk)
    return distances / np.sqrt(pixels)


def kth_neighbour_radii(features: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Distance of every row to its k-th nearest *other* row of the same set: (N,)."""
    features = _as_features(features, "features")
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} samples, got {k}")
    radii = np.empty(len(features))
    for start, block in _distance_blocks(features, features, chunk):
        rows = np.arange(len(block))
        block[rows, start + rows] = np.inf  # a sample is not its own neighbour
        # the k-th smallest (1-based) of the others is at position k - 1
        radii[start : start + len(block)] = np.partition(block, k - 1, axis=1)[:, k - 1]
    return radii


def _inside_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Whether each query lies in the union of balls B(support_j, radii_j): (N,) bool."""
    inside = np.empty(len(queries), dtype=bool)
    for start, block in _distance_blocks(queries, support, chunk):
        inside[start : start + len(block)] = (block <= radii[None, :]).any(axis=1)
    return inside


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # share of synthetic samples inside the real manifold (fidelity)
    recall: float  # share of real samples inside the synthetic manifold (coverage)
    k: int  # neighbourhood size of the manifold estimate


def precision_recall(
    real: np.ndarray, synthetic: np.ndarray, k: int = 3, chunk: int = DEFAULT_CHUNK
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its samples with radius the distance
    to the sample's k-th nearest neighbour in its own set. Precision: the share of synthetic
    samples in the real manifold; recall: the share of real samples in the synthetic one.
    The estimate depends on the set sizes; compare sets of equal size (the paper's advice).
    """
    real = _as_features(real, "real")
    synthetic = _as_features(synthetic, "synthetic")
    precision = _inside_manifold(synthetic, real, kth_neighbour_radii(real, k, chunk), chunk).mean()
    recall = _inside_manifold(real, synthetic, kth_neighbour_radii(synthetic, k, chunk), chunk).mean()
    return PrecisionRecall(float(precision), float(recall), k)


@dataclass(frozen=True)
class DensityCoverage:
    density: float  # mean number of real balls a synthetic sample falls in, / k (1 = real-like; can exceed 1)
    coverage: float  # share of real samples whose ball holds at least one synthetic sample
    k: int


def density_coverage(
    real: np.ndarray, synthetic: np.ndarray, k: int = 5, chunk: int = DEFAULT_CHUNK
) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020), both on the real set's k-NN balls only.

    Unlike recall, coverage does not grow with outliers of the synthetic set, and unlike
    precision, density counts how many real neighbourhoods a sample sits in. The paper uses
    k = 5; a ball holds a point strictly inside its radius, as the authors' `prdc` package.
    """
    real = _as_features(real, "real")
    synthetic = _as_features(synthetic, "synthetic")
    radii = kth_neighbour_radii(real, k, chunk)
    inside = 0
    covered = np.zeros(len(real), dtype=bool)
    for _, block in _distance_blocks(synthetic, real, chunk):  # (b, N real)
        hits = block < radii[None, :]
        inside += int(hits.sum())
        covered |= hits.any(axis=0)
    return DensityCoverage(inside / (k * len(synthetic)), float(covered.mean()), k)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    tr((S_a S_b)^1/2) equals tr((S_a^1/2 S_b S_a^1/2)^1/2), and the latter matrix is
    symmetric PSD, so it needs only eigendecompositions (no general sqrtm, no complex
    round-off): the trace is the sum of the square roots of its eigenvalues.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mean_a - mean_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) with the unbiased (N - 1) normalisation."""
    features = _as_features(features, "features")
    if len(features) < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def subsample_indices(n: int, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of range(n), sorted, chosen by a generator of `seed` (all of them if n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def diversity(features: np.ndarray, max_samples: int = DIVERSITY_MAX_SAMPLES, seed: int = 0,
              chunk: int = DEFAULT_CHUNK) -> float:
    """Mean Euclidean distance over distinct pairs (of a deterministic subsample of `max_samples`)."""
    features = _as_features(features, "features")
    features = features[subsample_indices(len(features), max_samples, seed)]
    n = len(features)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    total = 0.0
    for _, block in _distance_blocks(features, features, chunk):
        total += block.sum()  # the zero diagonal adds nothing
    return float(total / (n * (n - 1)))


@dataclass(frozen=True)
class Memorization:
    threshold: float  # the `percentile`-th percentile of held-out-real-to-training distances
    share: float  # share of synthetic samples at or below the threshold
    percentile: float  # which percentile sets the threshold
    flagged: np.ndarray  # (N,) bool: synthetic sample i is at or below the threshold


def memorization(
    synthetic_to_training: np.ndarray, heldout_to_training: np.ndarray, percentile: float = 1.0
) -> Memorization:
    """Flag synthetic samples closer to a training sample than real unseen samples usually get.

    Arguments are nearest-training distances (`nearest_distances(..., training)[0]`). A real
    mass the generator never saw is at or below the threshold `percentile`% of the time, so a
    generator that does not copy scores about `percentile`%; exact copies score 100%.
    """
    synthetic_to_training = np.asarray(synthetic_to_training, dtype=np.float64)
    heldout_to_training = np.asarray(heldout_to_training, dtype=np.float64)
    if len(heldout_to_training) == 0:
        raise ValueError("memorization needs held-out real distances for its threshold")
    threshold = float(np.percentile(heldout_to_training, percentile))
    # <=, not <: if held-out real masses duplicate training ones (threshold 0), copies still count.
    flagged = synthetic_to_training <= threshold
    share = float(flagged.mean()) if len(flagged) else float("nan")
    return Memorization(threshold, share, float(percentile), flagged)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of equal entries (NaN for an empty set)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} differ in shape")
    return float((predicted == labels).mean()) if len(labels) else float("nan")


def head_accuracies(
    margin_predicted: np.ndarray, shape_predicted: np.ndarray, margin_labels: np.ndarray, shape_labels: np.ndarray
) -> dict[str, float]:
    """{'margin', 'shape', 'mean', 'both'}: accuracy per head, their mean, and both heads right."""
    margin = accuracy(margin_predicted, margin_labels)
    shape = accuracy(shape_predicted, shape_labels)
    both_right = (np.asarray(margin_predicted) == np.asarray(margin_labels)) & (
        np.asarray(shape_predicted) == np.asarray(shape_labels)
    )
    return {
        "margin": margin,
        "shape": shape,
        "mean": (margin + shape) / 2.0,
        "both": float(both_right.mean()) if len(both_right) else float("nan"),
    }
