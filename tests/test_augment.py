"""Augmentation: shapes, and that flips and crops are exactly what they claim to be."""

import pytest
import torch
import torch.nn.functional as F

from f2m_ray.core.augment import DIFF_AUGMENT_SHIFT, augment, diff_augment, random_brightness_contrast, random_crops, random_flips


def _images(batch=64, size=16):
    torch.manual_seed(0)
    return torch.rand(batch, 1, size, size) * 2 - 1  # (B, 1, H, W) in [-1, 1]


@pytest.mark.parametrize(
    "shape", [(1, 1, 64, 64), (7, 1, 64, 64), (4, 3, 16, 16), (32, 1, 64, 64)]
)
def test_shapes_and_range_are_kept(shape):
    images = torch.rand(shape) * 2 - 1
    rng = torch.Generator().manual_seed(1)
    assert random_flips(images, rng).shape == shape
    assert random_crops(images, 4, rng).shape == shape
    out = augment(images, generator=rng)
    assert out.shape == shape and out.dtype == images.dtype
    assert out.min() >= images.min() and out.max() <= images.max()  # reflection adds no new values


def test_each_flip_is_one_of_the_four_flips_and_all_occur():
    images = _images()
    out = random_flips(images, torch.Generator().manual_seed(3))
    seen = [0, 0, 0, 0]  # none, left-right, up-down, both
    for x, y in zip(images, out):
        candidates = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, y)]
        assert len(matches) == 1
        seen[matches[0]] += 1
    assert sum(seen) == 64 and min(seen) >= 5  # p = 1/4 each; 64 draws


def test_crop_is_a_window_of_the_reflect_padded_image():
    images, padding = _images(batch=32, size=12), 3
    out = random_crops(images, padding, torch.Generator().manual_seed(5))
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = set()
    for i in range(images.shape[0]):
        found = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(padded[i, :, dy : dy + 12, dx : dx + 12], out[i])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets vary across the batch (49 possible)


def test_no_padding_and_no_flips_is_identity():
    images = _images(batch=8)
    assert torch.equal(random_crops(images, 0), images)
    assert torch.equal(augment(images, flips=False, crop_padding=0), images)


def test_same_seed_same_augmentation():
    images = _images(batch=16)
    a = augment(images, generator=torch.Generator().manual_seed(11))
    b = augment(images, generator=torch.Generator().manual_seed(11))
    c = augment(images, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_brightness_contrast_is_an_affine_map_per_image_within_bounds():
    images = _images(batch=32)
    out = random_brightness_contrast(images, 0.2, 0.3, torch.Generator().manual_seed(2))
    scales, shifts = [], []
    for x, y in zip(images.flatten(1), out.flatten(1)):
        # y = (x + b - mean(x + b)) * c + mean(x + b) = c * x + (1 - c) * mean(x) + b
        c = ((y - y.mean()) @ (x - x.mean())) / ((x - x.mean()) @ (x - x.mean()))
        torch.testing.assert_close(y, c * x + (y.mean() - c * x.mean()))
        scales.append(c.item())
        shifts.append((y.mean() - x.mean()).item())
    assert 0.7 <= min(scales) and max(scales) <= 1.3 and max(scales) - min(scales) > 0.2
    assert -0.2 <= min(shifts) and max(shifts) <= 0.2 and max(shifts) - min(shifts) > 0.1


def test_diff_augment_shifts_within_bounds_and_passes_gradients():
    images = _images(batch=8, size=64).requires_grad_(True)
    rng = torch.Generator().manual_seed(4)
    out = diff_augment(images, rng)
    assert out.shape == images.shape
    out.sum().backward()  # G's gradient reaches its fakes through the augmentation
    assert images.grad is not None and images.grad.abs().sum() > 0
    # Without the colour jitter it is exactly a window of the mirrored image, shifted by <= DIFF_AUGMENT_SHIFT.
    padded = F.pad(images.detach(), (DIFF_AUGMENT_SHIFT,) * 4, mode="reflect")
    shifted = random_crops(images.detach(), DIFF_AUGMENT_SHIFT, torch.Generator().manual_seed(4))
    for i in range(8):
        assert any(torch.equal(padded[i, :, dy : dy + 64, dx : dx + 64], shifted[i])
                   for dy in range(2 * DIFF_AUGMENT_SHIFT + 1) for dx in range(2 * DIFF_AUGMENT_SHIFT + 1))
    again = diff_augment(images.detach(), torch.Generator().manual_seed(4))
    assert torch.equal(again, out.detach())  # the same generator state, the same augmentation
    assert not torch.equal(diff_augment(images.detach(), rng), out.detach())  # a fresh draw per call
