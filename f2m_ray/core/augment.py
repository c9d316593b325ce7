"""Training-time augmentation (paper 3.2): random horizontal and vertical flips, random crops;
and `diff_augment`, the differentiable augmentation of a discriminator's inputs.

One pure function on a batch, vectorised (no Python loop over samples), driven by an
explicit ``torch.Generator`` so that a worker's augmentation is reproducible from its
seed. The crop pads by reflection and crops back to the input size at a random offset:
the ROI keeps its size (the networks need 64x64) and no black borders appear that a
discriminator could learn to look for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flips(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with p=0.5 and, independently, up-down with p=0.5.

    images: (B, C, H, W) -> (B, C, H, W)
    """
    batch = images.shape[0]
    flip_lr = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu") < 0.5
    flip_ud = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu") < 0.5
    flip_lr = flip_lr.to(images.device)[:, None, None, None]  # (B, 1, 1, 1)
    flip_ud = flip_ud.to(images.device)[:, None, None, None]
    out = torch.where(flip_lr, images.flip(-1), images)
    return torch.where(flip_ud, out.flip(-2), out)


def random_crops(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reflect-pad by `padding` pixels and crop back to (H, W) at a random offset per image.

    images: (B, C, H, W) -> (B, C, H, W); each output is a shift of its input by
    (dy, dx) in [-padding, padding]^2 with mirrored content at the border.
    """
    if padding <= 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode="reflect")  # (B, C, H+2p, W+2p)
    device = generator.device if generator else "cpu"
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, W)
    b = torch.arange(batch, device=images.device)[:, None, None, None]  # (B, 1, 1, 1)
    c = torch.arange(channels, device=images.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def augment(
    images: torch.Tensor, flips: bool = True, crop_padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The paper's augmentation: random crop (as a shift with mirrored borders), then random flips."""
    out = random_crops(images, crop_padding, generator)
    return random_flips(out, generator) if flips else out


def random_brightness_contrast(
    images: torch.Tensor, brightness: float = 0.2, contrast: float = 0.3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image: add U(-brightness, brightness), then scale about the image's mean by U(1 - contrast, 1 + contrast).

    images: (B, C, H, W) -> (B, C, H, W); differentiable in `images`.
    """
    batch = images.shape[0]
    device = generator.device if generator else "cpu"
    shift = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * brightness
    scale = 1 + (torch.rand(batch, generator=generator, device=device) * 2 - 1) * contrast
    shift = shift.to(images.device, images.dtype)[:, None, None, None]
    scale = scale.to(images.device, images.dtype)[:, None, None, None]
    out = images + shift
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * scale + mean


DIFF_AUGMENT_SHIFT = 6  # pixels: about 1/10 of the ROI, short of moving a centred mass out of view


def diff_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation of what a discriminator sees (Zhao et al., NeurIPS 2020).

    A random shift of up to DIFF_AUGMENT_SHIFT pixels (mirrored borders) and a brightness and
    contrast jitter, drawn afresh for every call. Applied alike to real and fake images, in D's
    step and in G's, it keeps D from keying on pixel-exact marks that G can paint into its
    fakes, and G's gradient passes through it. No flips: those are already in the data.
    """
    return random_brightness_contrast(random_crops(images, DIFF_AUGMENT_SHIFT, generator), generator=generator)
