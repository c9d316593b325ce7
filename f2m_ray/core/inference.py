"""The decoder as synthesis runs it: the same function as `Decoder` in eval mode, laid out for speed.

    Decoder (training)                               InferenceDecoder (synthesis)
    LeakyReLU - ConvT 4/2 - BatchNorm  (1x1 -> 2x2)   LeakyReLU - one matrix (B, 1024) @ (1024, 512*2*2)
    LeakyReLU - ConvT 4/2 - BatchNorm  (2x2 -> 4x4)   LeakyReLU - one matrix (B, 2048) @ (2048, 512*4*4)
    LeakyReLU - ConvT 4/2 - BatchNorm  x4             LeakyReLU - ConvT 4/2 with BatchNorm folded in,
                                                                 channels_last (oneDNN's fast layout)
    LeakyReLU - ConvT 3/1 - tanh                      LeakyReLU - ConvT 3/1, channels_last - tanh

Why each change (paper preset, one CPU thread, batch 64, benchmarks/synthesis_throughput.py):
- BatchNorm in eval mode is an affine map per channel: folded into the transposed conv's
  weights and bias it costs nothing instead of a pass over every activation.
- A transposed conv on a 1x1 or 2x2 input is a small dense linear map. As a convolution most
  of its taps fall outside the image (12 of 16 on the 1x1 input) and oneDNN runs it at a tenth
  of the machine's matmul rate; as one matrix (each tap's weights placed where it lands), it is
  one GEMM.
- The 8x8..64x64 layers run in channels_last, where oneDNN's transposed convolutions reach
  ~90% of the machine's fp32 matmul peak on AVX2 (against ~60% in NCHW on the 64- and
  32-channel layers), and the last 32 -> 1 conv runs 2.7x faster.
- LeakyReLU in place: no new activation tensors.

The outputs equal `Decoder`'s up to float rounding (max 2e-6 on the shipped model); the
8-bit images can differ by one grey level in rare pixels, so the synthesized bytes are those
of this module (the tool version is part of a synthesis run's identity).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
import torch.nn.functional as F

from f2m_ray.core.networks import Decoder

DENSE_MAX_INPUT = 2  # layers whose input is at most this many pixels a side become one matrix


def fold_batchnorm(conv: nn.ConvTranspose2d, norm: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``norm(conv(x))`` in eval mode as one transposed conv."""
    weight = conv.weight.detach().float()  # (C_in, C_out, k, k)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    if norm is None:
        return weight.clone(), bias.clone()
    scale = norm.weight.detach().float() / torch.sqrt(norm.running_var.float() + norm.eps)  # (C_out,)
    return weight * scale[None, :, None, None], (bias - norm.running_mean.float()) * scale + norm.bias.detach().float()


def _output_size(size: int, conv: nn.ConvTranspose2d) -> int:
    return (size - 1) * conv.stride[0] - 2 * conv.padding[0] + conv.kernel_size[0] + conv.output_padding[0]


class _Dense(nn.Module):
    """A transposed conv on a tiny input as the matrix it is: (B, C_in*s*s) -> (B, C_out, o, o)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, conv: nn.ConvTranspose2d, size: int):
        super().__init__()
        c_in, c_out, k = weight.shape[0], weight.shape[1], weight.shape[2]
        self.out_channels, self.out_size = c_out, _output_size(size, conv)
        stride, pad = conv.stride[0], conv.padding[0]
        # Input pixel (iy, ix) reaches output pixel (iy * stride - pad + ky, ix * stride - pad + kx) through tap (ky, kx).
        matrix = torch.zeros(c_in, size, size, c_out, self.out_size, self.out_size)
        for iy, ix, ky, kx in itertools.product(range(size), range(size), range(k), range(k)):
            oy, ox = iy * stride - pad + ky, ix * stride - pad + kx
            if 0 <= oy < self.out_size and 0 <= ox < self.out_size:
                matrix[:, iy, ix, :, oy, ox] = weight[:, :, ky, kx]
        self.register_buffer("matrix", matrix.reshape(c_in * size * size, -1))  # (C_in*s*s, C_out*o*o)
        self.register_buffer("bias", bias.repeat_interleave(self.out_size * self.out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.flatten(1), self.matrix)  # (B, C_out*o*o)
        return y.view(-1, self.out_channels, self.out_size, self.out_size)


class _ConvT(nn.Module):
    """A transposed conv with its BatchNorm folded in, on channels_last activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, conv: nn.ConvTranspose2d):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.stride, self.padding, self.output_padding = conv.stride, conv.padding, conv.output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)


class InferenceDecoder(nn.Module):
    """(B, feature_dim) -> (B, 1, 64, 64) in [-1, 1]: `Decoder` in eval mode, for synthesis only."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        layers: list[nn.Module] = []
        slopes = []
        size = 1  # the decoder starts from the feature as a 1x1 map
        for block in decoder.net:
            slopes.append(next(m.negative_slope for m in block if isinstance(m, nn.LeakyReLU)))
            conv = next(m for m in block if isinstance(m, nn.ConvTranspose2d))
            norm = next((m for m in block if isinstance(m, nn.BatchNorm2d)), None)
            weight, bias = fold_batchnorm(conv, norm)
            layers.append(_Dense(weight, bias, conv, size) if size <= DENSE_MAX_INPUT else _ConvT(weight, bias, conv))
            size = _output_size(size, conv)
        self.layers = nn.ModuleList(layers)
        self.slopes = tuple(slopes)  # every decoder block starts with LeakyReLU

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(features, self.slopes[0])  # (B, D): a new tensor, the caller's features stay as they are
        for i, (layer, slope) in enumerate(zip(self.layers, self.slopes)):
            if i:
                x = F.leaky_relu_(x, slope)
            x = layer(x)
        return torch.tanh(x).contiguous()  # (B, 1, 64, 64)


def inference_decoder(decoder: Decoder) -> InferenceDecoder:
    """The synthesis decoder of a trained `Decoder` (its weights and BatchNorm statistics), in eval mode."""
    return InferenceDecoder(decoder).eval()
