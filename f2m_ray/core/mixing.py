"""Visual-feature processing (paper 2.2, 3.3, 3.4): weights, schemes and combinations.

    v = sum_k alpha_k v_k,   alpha_k >= 0,   sum_k alpha_k = 1          (eq. 2)

Mixing schemes (``SCHEMES``; ``synthesize --mixing NAME``) differ in how many seeds a
sample draws and in how their weights combine them:

- ``paper``: eq. 2 as written, K = 20 seeds, Dirichlet(1) weights on the 0.05 grid. A uniform
  mix of K features sits near the category mean: its deviation from the mean shrinks by about
  sqrt(2 / (K + 1)) (0.31 for K = 20), so the masses look alike.
- ``variance-preserving``: the same seeds and weights, combined as
  ``c + s(w) sum_k w_k (v_k - c)`` with ``c`` the category centroid (mean feature of the
  category's seed pool of N) and ``s(w) = sqrt((N - 1) / (N ||w||^2 - 1))``, about
  ``1 / ||w||_2`` for large pools (``variance_preserving_scale``): the mix has the spread of one
  feature; a one-hot weight returns that seed's feature.
- ``sparse``: eq. 2 over K = 3 seeds: mixes stay close to the segment/triangle of a few
  real masses (more spread than ``paper``, less than one feature).

Category synthesis (Fig. 5) draws K seeds of one category and weights "randomly
initialised in units of 0.05". We draw the weights uniformly over all such
compositions: with U = 1/step units, counts ~ Multinomial(U, p), p ~ Dirichlet(alpha).
For alpha = 1 this Dirichlet-multinomial is exactly uniform over the
C(U + K - 1, K - 1) compositions of U into K parts (Bose-Einstein statistics);
larger alpha concentrates weight evenly, smaller alpha on few seeds.

Every random choice for sample i comes from ``sample_rng(run_seed, category_id, i)``,
a pure function of its arguments, so a plan does not depend on workers, blocks,
retries or resumes. Pure numpy: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from f2m_ray.errors import F2MError

# Domain separation for the per-sample streams (stable across versions: changing it changes outputs).
_STREAM_PLAN = 0x46324D  # "F2M"


def grid_units(step: float) -> int:
    """Units per whole for a weight grid: 0.05 -> 20. The step must divide 1."""
    if not 0 < step <= 1:
        raise F2MError(f"weight step must be in (0, 1], got {step}")
    units = round(1.0 / step)
    if abs(units * step - 1.0) > 1e-9:
        raise F2MError(f"weight step {step} does not divide 1 (try 0.05, 0.1, 0.25)")
    return units


def sample_rng(run_seed: int, category_id: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The generator for sample `index` of a category: a pure function of its arguments.

    `attempt` numbers the sub-seeds a sample tries in order when a candidate is rejected.
    """
    return np.random.default_rng([_STREAM_PLAN, run_seed, category_id, index, attempt])


def quantized_dirichlet(rng: np.random.Generator, k: int, step: float = 0.05, alpha: float = 1.0) -> np.ndarray:
    """K weights on a `step` grid summing to 1; uniform over such compositions when alpha = 1."""
    if k < 1:
        raise F2MError(f"need at least one weight, got k={k}")
    if alpha <= 0:
        raise F2MError(f"concentration alpha must be > 0, got {alpha}")
    units = grid_units(step)
    p = rng.dirichlet(np.full(k, float(alpha)))
    counts = rng.multinomial(units, p)
    return counts.astype(np.float64) / units


@dataclass(frozen=True)
class Plan:
    """What sample i is made of: positions in the category's seed pool and their weights."""

    seed_positions: np.ndarray  # (K,) int64, distinct, into the sorted seed pool
    weights: np.ndarray  # (K,) float64 on the step grid, sum 1


def plan_sample(
    run_seed: int,
    category_id: int,
    index: int,
    pool_size: int,
    k: int = 20,
    step: float = 0.05,
    alpha: float = 1.0,
    attempt: int = 0,
) -> Plan:
    """Seeds and weights for sample `index`: K distinct seeds (all of them if the pool is smaller)."""
    if pool_size < 2:
        raise F2MError(f"a category needs at least 2 seed features to mix, the pool has {pool_size}")
    rng = sample_rng(run_seed, category_id, index, attempt)
    k_used = min(k, pool_size)
    positions = rng.choice(pool_size, size=k_used, replace=False).astype(np.int64)
    weights = quantized_dirichlet(rng, k_used, step, alpha)
    order = np.argsort(-weights, kind="stable")  # largest weight first, as the paper's Fig. 5 lists them
    return Plan(positions[order], weights[order])


def _check_weights(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or not np.allclose(weights.sum(axis=-1), 1.0, atol=1e-9):
        raise F2MError("interpolation weights must be non-negative and sum to 1")
    return weights


def mix(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Convex combination (eq. 2) of one set of seeds: (N, D) features and (N,) or (B, N) weights -> (D,) or (B, D).

    ``mix_rows`` with the same N seeds in every row.
    """
    features = np.asarray(features)
    rows = np.atleast_2d(weights)
    mixed = mix_rows(np.broadcast_to(features, (len(rows), *features.shape)), rows)
    return mixed[0] if np.ndim(weights) == 1 else mixed


def variance_preserving_scale(weights: np.ndarray, pool_size: int | None = None) -> np.ndarray:
    """The factor that gives ``sum_k w_k (v_k - c)`` the spread of one seed's deviation: (b,).

    For independent deviations it is ``1 / ||w||_2``. When the K seeds are drawn without
    replacement from a pool of N whose mean is the centroid, their deviations sum to zero over
    the pool and are negatively correlated (covariance -s^2 / (N - 1)); the variance of the mix
    is then ``s^2 (N ||w||^2 - 1) / (N - 1)``, so the factor is ``sqrt((N - 1) / (N ||w||^2 - 1))``
    (1 for one-hot weights; ``1 / ||w||_2`` as N grows). Without it a mix of all 10 seeds of a
    small category keeps only about 0.67 of the spread. Where ``N ||w||^2 = 1`` (uniform weight on
    the whole pool) the mix is the centroid itself and the factor is irrelevant: 1.
    """
    squared = np.einsum("bk,bk->b", weights, weights)  # ||w||^2 in [1/K, 1]
    if pool_size is None:
        return 1.0 / np.sqrt(squared)
    if pool_size < 2:
        raise F2MError(f"a variance-preserving mix needs a pool of at least 2 seeds, got {pool_size}")
    excess = pool_size * squared - 1.0
    return np.where(excess > 1e-12, np.sqrt((pool_size - 1) / np.maximum(excess, 1e-12)), 1.0)


def mix_rows(
    features: np.ndarray, weights: np.ndarray, centroid: np.ndarray | None = None, pool_size: int | None = None
) -> np.ndarray:
    """Eq. 2 for a batch: (b, K, D) seed features, (b, K) weights -> (b, D) float32.

    With a `centroid` (D,), the variance-preserving mix ``c + s(w) sum_k w_k (v_k - c)`` with
    ``s = variance_preserving_scale(w, pool_size)``; `pool_size` is the number of seeds the K
    were drawn from when `centroid` is their mean (None: independent deviations, 1 / ||w||_2).
    einsum's own loops (no BLAS): the sum over K runs in a fixed order whatever the batch
    size or thread count, so a sample's mixed feature is bit-identical in every run.
    """
    weights = _check_weights(weights)
    features = np.asarray(features, dtype=np.float64)
    if centroid is None:
        return np.einsum("bk,bkd->bd", weights, features).astype(np.float32)
    c = np.asarray(centroid, dtype=np.float64)
    scale = variance_preserving_scale(weights, pool_size)
    deviation = np.einsum("bk,bkd->bd", weights, features - c)
    return (c + deviation * scale[:, None]).astype(np.float32)


@dataclass(frozen=True)
class Scheme:
    """How a sample's seeds are drawn and combined (see the module docstring)."""

    name: str
    k: int  # seeds drawn per sample (default of --k)
    alpha: float  # Dirichlet concentration of the weights (default of --alpha)
    variance_preserving: bool  # combine around the category centroid, rescaled by 1/||w||_2
    summary: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("paper", 20, 1.0, False, "eq. 2 as written: convex mix of K=20 seeds (paper 3.4)"),
        Scheme("variance-preserving", 20, 1.0, True,
               "K=20 seeds, weights as the paper's, deviations from the category centroid rescaled to a single seed's spread"),
        Scheme("sparse", 3, 1.0, False, "convex mix of K=3 seeds"),
    )
}
DEFAULT_SCHEME = "variance-preserving"


def scheme(name: str) -> Scheme:
    """The scheme called `name`; unknown names raise F2MError listing the known ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise F2MError(f"unknown mixing scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


def line_weights(steps: int) -> np.ndarray:
    """Fig. 3: `steps` equidistant points between two seeds, ends included -> (steps, 2)."""
    if steps < 2:
        raise F2MError(f"a line needs at least 2 steps, got {steps}")
    t = np.linspace(0.0, 1.0, steps)
    return np.stack([1.0 - t, t], axis=1)


def barycentric_grid(steps: int) -> np.ndarray:
    """Fig. 4: all (a, b, c) = (i, j, n-i-j)/n on a triangle with n = steps-1 subdivisions.

    Rows come ordered as a triangle (row r has r+1 points), corners are the seeds.
    -> (steps*(steps+1)/2, 3)
    """
    if steps < 2:
        raise F2MError(f"a barycentric grid needs at least 2 steps per side, got {steps}")
    n = steps - 1
    rows = []
    for r in range(n + 1):  # r = distance from the first corner
        for j in range(r + 1):
            rows.append(((n - r) / n, (r - j) / n, j / n))
    return np.asarray(rows, dtype=np.float64)
