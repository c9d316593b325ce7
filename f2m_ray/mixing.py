"""Visual-feature processing (paper 2.2, 3.3, 3.4): weights and convex combinations.

    v = sum_k alpha_k v_k,   alpha_k >= 0,   sum_k alpha_k = 1          (eq. 2)

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


def mix(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Convex combination (eq. 2): (N, D) features and (N,) or (B, N) weights -> (D,) or (B, D)."""
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or not np.allclose(weights.sum(axis=-1), 1.0, atol=1e-9):
        raise F2MError("interpolation weights must be non-negative and sum to 1")
    return (weights @ np.asarray(features, dtype=np.float64)).astype(np.float32)


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
