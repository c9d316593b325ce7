"""Classifier two-sample test: can a small CNN tell synthetic masses from real ones?

A fresh CNN is trained to label real masses 0 and synthetic ones 1 on half of each set (equal
counts), then scored on the other half: the held-out ROC AUC is 0.5 when it cannot tell them
apart and 1.0 when it always can (Lopez-Paz and Oquab 2017). The same test on real masses against
the same masses blurred by 1 px is the calibrator beside it: how strongly the test reacts to a
difference a person would call small. Pure torch and numpy, one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from f2m_ray.core.augment import random_flips
from f2m_ray.core.mass_metrics import gaussian_blur

DEFAULT_STEPS = 400
BATCH = 64
MIN_ROWS = 20  # per set: below this the held-out AUC means nothing


@dataclass(frozen=True)
class TwoSampleResult:
    auc: float  # held-out ROC AUC of real (0) vs synthetic (1)
    train_rows: int  # per set
    test_rows: int  # per set
    steps: int


def _classifier() -> nn.Module:
    """(B, 1, 64, 64) -> (B,) logit: four stride-2 conv blocks, global average pool, linear."""
    layers: list[nn.Module] = []
    channels = (1, 16, 32, 64, 64)
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 1))


def roc_auc(scores_negative: np.ndarray, scores_positive: np.ndarray) -> float:
    """P(positive score > negative score) + half P(tie): the Mann-Whitney U over n0 * n1."""
    neg = np.sort(np.asarray(scores_negative, dtype=np.float64))
    pos = np.asarray(scores_positive, dtype=np.float64)
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(neg) * len(pos)))


def two_sample_auc(real: np.ndarray, synthetic: np.ndarray, steps: int = DEFAULT_STEPS, seed: int = 0) -> TwoSampleResult:
    """Held-out AUC of a CNN trained to tell `synthetic` (N, 64, 64) in [-1, 1] from `real` (M, 64, 64)."""
    n = min(len(real), len(synthetic))
    if n < MIN_ROWS:
        raise ValueError(f"a two-sample test needs at least {MIN_ROWS} masses of each kind, got {len(real)} real "
                         f"and {len(synthetic)} synthetic")
    rng = np.random.default_rng(seed)
    a = np.asarray(real, dtype=np.float32)[rng.permutation(len(real))[:n]]
    b = np.asarray(synthetic, dtype=np.float32)[rng.permutation(len(synthetic))[:n]]
    half = n // 2
    x_train = torch.from_numpy(np.concatenate([a[:half], b[:half]])).unsqueeze(1)
    y_train = torch.cat([torch.zeros(half), torch.ones(half)])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = _classifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (min(BATCH, len(x_train)),), generator=generator)
        x = random_flips(x_train[idx], generator)
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(1), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.inference_mode():
        score_a = net(torch.from_numpy(a[half:]).unsqueeze(1)).squeeze(1).numpy()
        score_b = net(torch.from_numpy(b[half:]).unsqueeze(1)).squeeze(1).numpy()
    return TwoSampleResult(roc_auc(score_a, score_b), half, n - half, steps)


def blur_calibrator(real: np.ndarray, steps: int = DEFAULT_STEPS, seed: int = 0, sigma: float = 1.0) -> TwoSampleResult:
    """The same test on real masses against the other real masses blurred by `sigma` px (disjoint halves)."""
    real = np.asarray(real, dtype=np.float32)
    order = np.random.default_rng(seed + 1).permutation(len(real))
    first, second = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    return two_sample_auc(first, gaussian_blur(second, sigma), steps, seed)
