"""The losses of eq. 3-5, pure PyTorch.

Reading of the paper's notation. Eq. 3-5 write the label terms as
``log(1 - (m - D^m(I)))``: with ``m`` a one-hot label and ``D^m`` a predicted
distribution, the term grows as the prediction approaches the label, i.e. it is
a label likelihood. We implement it as its standard form, the cross-entropy
``CE(m, D^m(.))`` on label logits, which the paper's text describes ("decrease
when D predicts the ground truth label more precisely"). The adversarial terms
are the usual minimax BCE on real/fake logits, and G uses the non-saturating
form (``BCE(D(I'), 1)``) since the paper's ``log D(I')`` term is to be maximised
by G. All losses below are written to be minimised:

    D_k: BCE(D_k(I), 1) + BCE(D_k(I'), 0) + lambda_k * (CE(y_k, D_k(I)) + w * CE(y_k, D_k(I')))   k = 1 margin, 2 shape
    G:   BCE(D_1(I'), 1) + BCE(D_2(I'), 1) + lambda3 * (CE(m, D_1(I')) + CE(s, D_2(I'))) + lambda4 * L1(I, I')

Options beyond the paper (``LossConfig``; their defaults give the line above): the adversarial
terms of G weighted by ``lambda_adversarial``, ``+ lambda_gradient * L1(grad I, grad I')`` and
``+ lambda_feature_matching * mean_l L1(D_l(I'), D_l(I))`` over D1's and D2's conv stages.

With ``LossConfig.lambda_mix`` = W > 0 (training for mixes; not in the paper) D and G also see M
decoded mixes ``I^`` of same-category features, labelled with their category:

    D_k: ... + W * (BCE(D_k(I^), 0) + lambda_k * w * CE(y_k, D_k(I^)))
    G:   ... + W * (BCE(D_1(I^), 1) + BCE(D_2(I^), 1) + lambda3 * (CE(m, D_1(I^)) + CE(s, D_2(I^))))

``w`` (``LossConfig.fake_label_weight``) is 1 in the paper's equations. Below 1, D learns its
labels mostly from real masses, so G is rewarded for drawing real margin and shape cues rather
than marks only D reads; the ``small`` preset uses 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from f2m_ray.config import LossConfig


@dataclass
class DiscriminatorOutputs:
    """What one discriminator said about a real and a fake batch."""

    real_logit: torch.Tensor  # (B,)
    real_labels: torch.Tensor  # (B, n_classes)
    fake_logit: torch.Tensor  # (B,)
    fake_labels: torch.Tensor  # (B, n_classes)


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logit.float(), torch.full_like(logit, target, dtype=torch.float32))


def discriminator_loss(
    out: DiscriminatorOutputs, labels: torch.Tensor, label_weight: float, fake_label_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Eq. 3 (D1, label_weight = lambda1) or eq. 4 (D2, label_weight = lambda2), to minimise.

    ``fake_label_weight`` scales the label term on fakes (1.0 is the paper's equation).
    """
    # D: real -> 1, fake -> 0
    adversarial = _bce(out.real_logit, 1.0) + _bce(out.fake_logit, 0.0)
    # D: predict the true label on real and on fake (the paper's augmentation effect)
    label_real = F.cross_entropy(out.real_labels.float(), labels)
    label_fake = F.cross_entropy(out.fake_labels.float(), labels)
    total = adversarial + label_weight * (label_real + fake_label_weight * label_fake)
    return {"total": total, "adversarial": adversarial, "label_real": label_real, "label_fake": label_fake}


def mix_discriminator_loss(
    fake_logit: torch.Tensor, fake_labels: torch.Tensor, labels: torch.Tensor, label_weight: float,
    fake_label_weight: float,
) -> torch.Tensor:
    """D's terms on decoded mixes: fake -> 0, and their category's label at the fakes' label weight."""
    return _bce(fake_logit, 0.0) + label_weight * fake_label_weight * F.cross_entropy(fake_labels.float(), labels)


def mix_generator_loss(
    margin_logit: torch.Tensor,
    margin_labels_logits: torch.Tensor,
    shape_logit: torch.Tensor,
    shape_labels_logits: torch.Tensor,
    margins: torch.Tensor,
    shapes: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """G's terms without a target image (eq. 5 less L1): pass D1 and D2 as real and show the labels.

    On decoded mixes as it is; ``generator_loss`` adds the L1 term to it for reconstructions.
    """
    # G: fool both discriminators (non-saturating)
    adversarial = _bce(margin_logit, 1.0) + _bce(shape_logit, 1.0)
    # G: make its images show their margin and shape to D1 and D2
    labels = F.cross_entropy(margin_labels_logits.float(), margins) + F.cross_entropy(shape_labels_logits.float(), shapes)
    total = cfg.lambda_adversarial * adversarial + cfg.lambda_generator_labels * labels
    return {"total": total, "adversarial": adversarial, "labels": labels}


def gradient_l1(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of (B, 1, H, W) images."""
    fake, real = fake.float(), real.float()
    dx = F.l1_loss(fake[..., :, 1:] - fake[..., :, :-1], real[..., :, 1:] - real[..., :, :-1])
    dy = F.l1_loss(fake[..., 1:, :] - fake[..., :-1, :], real[..., 1:, :] - real[..., :-1, :])
    return dx + dy


def feature_matching(fake_maps: list[torch.Tensor], real_maps: list[torch.Tensor]) -> torch.Tensor:
    """pix2pixHD's term: mean over D's layers of L1(features of I', features of I), real side detached."""
    terms = [F.l1_loss(f.float(), r.detach().float()) for f, r in zip(fake_maps, real_maps)]
    return torch.stack(terms).mean()


def generator_loss(
    margin_logit: torch.Tensor,
    margin_labels_logits: torch.Tensor,
    shape_logit: torch.Tensor,
    shape_labels_logits: torch.Tensor,
    margins: torch.Tensor,
    shapes: torch.Tensor,
    real: torch.Tensor,
    fake: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """Eq. 5, to minimise: D1(I') and D2(I') on fake -> 1, labels kept, I' close to I."""
    terms = mix_generator_loss(margin_logit, margin_labels_logits, shape_logit, shape_labels_logits, margins, shapes, cfg)
    # G: stay close to the input (forms the manifold around real masses)
    l1 = F.l1_loss(fake.float(), real.float())
    total = terms["total"] + cfg.lambda_l1 * l1
    if cfg.lambda_gradient:  # G: the same edges as the input
        total = total + cfg.lambda_gradient * gradient_l1(fake, real)
    return {**terms, "total": total, "l1": l1}
