"""Mass fidelity, identity and outline spread on cases with a known answer (f2m_ray.core.mass_metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from f2m_ray.core.images import to_model_range
from f2m_ray.core.mass_metrics import (
    dilate, gaussian_blur, mass_distances, mass_fidelity, outline_masks, outline_spread,
)
from f2m_ray.data.phantom import generate_phantoms, phantoms_with_masks
from f2m_ray.labels import parse_category


def _masses(n=16, name="spiculated-irregular", seed=11):
    rows = list(phantoms_with_masks(n, seed, [parse_category(name)]))
    return np.stack([to_model_range(r[1]) for r in rows]), np.stack([r[2] for r in rows])


def test_phantoms_with_masks_are_generate_phantoms_plus_their_lesions():
    cats = [parse_category("circumscribed-oval"), parse_category("spiculated-irregular")]
    plain = list(generate_phantoms(6, 3, cats))
    masked = list(phantoms_with_masks(6, 3, cats))
    for (i, img, cat), (j, img2, mask, cat2) in zip(plain, masked):
        assert (i, cat) == (j, cat2) and np.array_equal(img, img2)
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0.0, 1.0}
        inside, outside = img[mask > 0].mean(), img[dilate(mask[None], 3)[0] == 0].mean()
        assert inside > outside + 10  # the mask is where the bright mass is (grey levels)


def test_the_masses_themselves_score_one_and_a_template_scores_zero():
    images, masks = _masses()
    exact = mass_fidelity(images, masks, images)
    assert exact.fidelity == pytest.approx(1.0) and exact.identity == 1.0 and exact.n == 16
    template = np.repeat(images.mean(axis=0, keepdims=True), len(images), axis=0)  # one picture for every mass
    flat = mass_fidelity(images, masks, template)
    assert abs(flat.fidelity) < 1e-6 and flat.identity == 0.0  # own is never strictly nearer than the others


def test_blur_lowers_fidelity_in_order_and_keeps_identity():
    images, masks = _masses()
    scores = [mass_fidelity(images, masks, gaussian_blur(images, s)) for s in (1.0, 2.0, 3.0)]
    assert scores[0].fidelity > scores[1].fidelity > scores[2].fidelity > 0.2
    assert 0.5 < scores[0].fidelity < 0.8  # a 1-px blur keeps most of the mass's detail
    assert all(s.identity == 1.0 for s in scores)


def test_distances_are_rms_inside_the_dilated_mask_of_the_row():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32)).astype(np.float32)
    recon = rng.normal(size=(3, 32, 32)).astype(np.float32)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[:, 14:18, 14:18] = 1
    d = mass_distances(images, masks, recon)
    from f2m_ray.core.mass_metrics import detail

    region = dilate(masks, 2)
    expected = np.sqrt(((detail(recon)[2] - detail(images)[0]) ** 2)[region[0]].mean())
    assert d.shape == (3, 3) and d[0, 2] == pytest.approx(expected, rel=1e-4)


def test_bad_shapes_and_empty_masks_are_refused():
    images, masks = _masses(4)
    with pytest.raises(ValueError, match="must all be"):
        mass_fidelity(images, masks, images[:3])
    with pytest.raises(ValueError, match="non-empty mask"):
        mass_fidelity(images, np.zeros_like(masks), images)
    with pytest.raises(ValueError, match="at least 2"):
        mass_fidelity(images[:1], masks[:1], images[:1])


def test_gaussian_blur_keeps_constants_and_sums():
    x = np.full((2, 16, 16), 3.0, np.float32)
    assert np.allclose(gaussian_blur(x, 2.0), 3.0)
    impulse = np.zeros((1, 33, 33), np.float32)
    impulse[0, 16, 16] = 1
    blurred = gaussian_blur(impulse, 1.5)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-5) and blurred[0, 16, 16] < 0.1


def test_outlines_follow_the_true_mask_and_a_template_has_no_spread():
    images, masks = _masses(16, "circumscribed-oval")
    outlines = outline_masks(images)
    iou = (outlines & (masks > 0)).sum((1, 2)) / (outlines | (masks > 0)).sum((1, 2))
    assert np.median(iou) > 0.6  # the segmented outline is the lesion
    assert outline_spread(masks > 0) > 0.3  # different masses, different outlines
    template = np.repeat(outlines[:1], 16, axis=0)
    assert outline_spread(template) == 0.0
    assert outline_spread(np.zeros((3, 8, 8), bool)) == 1.0  # nothing in common
