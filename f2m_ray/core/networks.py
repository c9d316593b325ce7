"""The Feature2Mass networks (paper section 2 and 3.2), pure PyTorch.

    E1(m), E2(s)   one-hot label -> FC 256 -> FC 4096 -> a 64x64 map each
    G = dec(enc(.))  enc: [I, E1(m), E2(s)] (3x64x64) -> 7 convs -> v (1024-d visual feature)
                     dec: v -> 7 transposed convs -> I' (1x64x64, tanh)
    D1, D2         10 convs + 3 FCs; heads: real/fake logit and label logits

Every block is LeakyReLU - Conv (or ConvTranspose) - BatchNorm, as the paper says.
Two deliberate exceptions: the encoder's stem sees raw pixels (no activation
before it) and its last conv has no BatchNorm, so that the visual feature of a
single ROI does not depend on what else is in the batch; the decoder's last conv
has no BatchNorm either and ends in tanh (images live in [-1, 1]).
There are no skip connections: the decoder must work from v alone, since v is
what the category synthesis interpolates.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from f2m_ray.config import ModelConfig


def _block(conv: nn.Module, out_channels: int, slope: float, act: bool = True, norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    if act:
        layers.append(nn.LeakyReLU(slope))
    layers.append(conv)
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class LabelEmbedding(nn.Module):
    """E1 or E2: a class id -> an image-sized map (one-hot -> FC hidden -> FC size*size)."""

    def __init__(self, n_classes: int, hidden: int, size: int, slope: float):
        super().__init__()
        self.n_classes = n_classes
        self.size = size
        self.net = nn.Sequential(
            nn.Linear(n_classes, hidden),
            nn.LeakyReLU(slope),
            nn.Linear(hidden, size * size),
        )

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(labels.long(), self.n_classes).float()  # (B, n_classes)
        return self.net(one_hot).view(-1, 1, self.size, self.size)  # (B, 1, H, W)


class Encoder(nn.Module):
    """(B, 3, 64, 64) -> (B, feature_dim): a stride-1 stem then six stride-2 convs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = cfg.encoder_channels
        layers = [_block(nn.Conv2d(3, chans[0], 3, 1, 1), chans[0], cfg.leaky_slope, act=False)]
        for i in range(1, len(chans)):
            last = i == len(chans) - 1
            layers.append(_block(nn.Conv2d(chans[i - 1], chans[i], 4, 2, 1), chans[i], cfg.leaky_slope, norm=not last))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # (B, feature_dim, 1, 1) -> (B, feature_dim)


# Nearest-neighbour upsampling by 2 then a 3x3 conv (padding 1) is, exactly, a 4x4 stride-2 transposed
# conv (padding 1) whose taps are sums of the 3x3 taps: along each axis, output row 2i takes
# w0 x[i-1] + (w1 + w2) x[i] and row 2i+1 takes (w0 + w1) x[i] + w2 x[i+1]. So K = A w A^T with:
_RESIZE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # (4, 3)


class ResizeConv2d(nn.ConvTranspose2d):
    """Upsample x2 (nearest) then conv 3x3, run as the equivalent 4x4 stride-2 transposed conv.

    No checkerboard (Odena et al. 2016): every output pixel sees the same number of taps, so a
    constant input gives a constant output. Its parameter is the 3x3 kernel ``weight3``
    (C_out, C_in, 3, 3); ``weight`` (C_in, C_out, 4, 4) is derived from it on every call, so the
    layer costs a transposed conv's FLOPs (16 taps at the input's size, not 9 at four times the
    pixels) and the synthesis decoder folds it like any transposed conv.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 4, 2, 1)
        del self.weight
        self.weight3 = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))

    @property
    def weight(self) -> torch.Tensor:  # (C_in, C_out, 4, 4)
        taps = _RESIZE_TAPS.to(self.weight3)  # a constant, not a buffer: nothing extra in a checkpoint
        return torch.einsum("ka,oiab,lb->iokl", taps, self.weight3, taps)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, 2, 1)


class Decoder(nn.Module):
    """(B, feature_dim) -> (B, 1, 64, 64): six stride-2 upsampling layers then a stride-1 output.

    ``cfg.upsample`` picks the stride-2 layer: the paper's 4x4 transposed conv ("transposed") or
    nearest-neighbour x2 + 3x3 conv ("resize", as ``ResizeConv2d``), which leaves no checkerboard.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = (cfg.feature_dim,) + cfg.decoder_channels
        layers = []
        for i in range(1, len(chans) - 1):
            if cfg.upsample == "resize":
                conv = ResizeConv2d(chans[i - 1], chans[i])
            else:
                conv = nn.ConvTranspose2d(chans[i - 1], chans[i], 4, 2, 1)
            layers.append(_block(conv, chans[i], cfg.leaky_slope))
        layers.append(_block(nn.ConvTranspose2d(chans[-2], chans[-1], 3, 1, 1), chans[-1], cfg.leaky_slope, norm=False))
        self.net = nn.Sequential(*layers)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(v[:, :, None, None]))  # (B, 1, 64, 64) in [-1, 1]


class Generator(nn.Module):
    """G(I, E1(m), E2(s)) = dec(enc([I, E1(m), E2(s)])), with `encode` and `decode` on their own."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_margin = LabelEmbedding(cfg.n_margins, cfg.embed_hidden, cfg.image_size, cfg.leaky_slope)  # E1
        self.embed_shape = LabelEmbedding(cfg.n_shapes, cfg.embed_hidden, cfg.image_size, cfg.leaky_slope)  # E2
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor, margins: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        """Visual features v: (B, 1, H, W) images in [-1, 1] plus label ids -> (B, feature_dim)."""
        x = torch.cat([images, self.embed_margin(margins), self.embed_shape(shapes)], dim=1)  # (B, 3, H, W)
        return self.encoder(x)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) -> (B, 1, H, W) images in [-1, 1]."""
        return self.decoder(features)

    def forward(self, images: torch.Tensor, margins: torch.Tensor, shapes: torch.Tensor,
                mix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """G(I): (B, 1, H, W) reconstructions.

        With ``mix = (weights (M, B), centroids (B, D))`` it also decodes M variance-preserving
        mixes of this batch's features (``variance_preserving_mix``) in the same decoder pass and
        returns ``(reconstructions, mixes (M, 1, H, W), features (B, D))``: one forward, so
        DistributedDataParallel sees every parameter the losses use.
        """
        features = self.encode(images, margins, shapes)
        if mix is None:
            return self.decode(features)
        mixed = variance_preserving_mix(features, *mix)
        decoded = self.decode(torch.cat([features, mixed]))
        return decoded[: len(features)], decoded[len(features):], features


def variance_preserving_mix(features: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Rows ``c + sum_j w_j (v_j - c_j) / ||w||_2`` (f2m_ray.core.mixing.mix_rows in torch).

    features (B, D); weights (M, B), each row non-negative, summing to 1, nonzero only on
    members of one category; centroids (B, D), each member's category centroid -> (M, D).
    """
    if len(weights) == 0:
        return features[:0]
    scale = weights.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weights @ centroids + (weights @ (features - centroids)) / scale


class Discriminator(nn.Module):
    """D1 (margin) or D2 (shape): 10 convs + 3 FCs -> (real/fake logit (B,), label logits (B, n_classes))."""

    def __init__(self, cfg: ModelConfig, n_classes: int):
        super().__init__()
        chans = (1,) + cfg.disc_channels
        layers = []
        for i in range(1, len(chans)):
            stride = 1 if i % 2 == 1 else 2  # (stride-1, stride-2) pairs: 64 -> 32 -> 16 -> 8 -> 4 -> 2
            kernel = 3 if stride == 1 else 4
            layers.append(
                _block(nn.Conv2d(chans[i - 1], chans[i], kernel, stride, 1), chans[i], cfg.leaky_slope, act=i > 1)
            )
        self.convs = nn.Sequential(*layers)
        spatial = cfg.image_size // 2 ** (len(cfg.disc_channels) // 2)
        fc_in = cfg.disc_channels[-1] * spatial * spatial
        self.fcs = nn.Sequential(
            nn.LeakyReLU(cfg.leaky_slope),
            nn.Linear(fc_in, cfg.disc_fc[0]),
            nn.LeakyReLU(cfg.leaky_slope),
            nn.Linear(cfg.disc_fc[0], cfg.disc_fc[1]),
            nn.LeakyReLU(cfg.leaky_slope),
        )
        # The third FC layer: one linear map whose outputs are split into the two heads.
        self.head = nn.Linear(cfg.disc_fc[1], 1 + n_classes)

    def forward(self, images: torch.Tensor, features: bool = False):
        """(real/fake logit (B,), label logits (B, n_classes)); with ``features`` also the output of
        each (stride-1, stride-2) conv pair, [(B, C, 32, 32), ..., (B, C, 2, 2)], for feature matching."""
        if features:
            maps = []
            x = images
            for i, block in enumerate(self.convs):
                x = block(x)
                if i % 2 == 1:
                    maps.append(x)
        else:
            x = self.convs(images)
        h = self.fcs(x.flatten(1))  # (B, disc_fc[1])
        out = self.head(h)  # (B, 1 + n_classes)
        return (out[:, 0], out[:, 1:], maps) if features else (out[:, 0], out[:, 1:])


def build_networks(cfg: ModelConfig) -> tuple[Generator, Discriminator, Discriminator]:
    """G, D1 (margin) and D2 (shape), initialised DCGAN-style (N(0, 0.02) convs, N(1, 0.02) BN)."""
    generator = Generator(cfg)
    d_margin = Discriminator(cfg, cfg.n_margins)
    d_shape = Discriminator(cfg, cfg.n_shapes)
    for net in (generator, d_margin, d_shape):
        net.apply(_init_weights)
    return generator, d_margin, d_shape


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, ResizeConv2d):
        nn.init.normal_(module.weight3, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
