"""Building blocks of the attention UNet (sections 3, 6 and 7 of the paper).

Every block follows section 6.2: inside a block, partial skips are reabsorbed *before* the
activation (``act(x + F(x))``), and a block ends with a linear layer plus a plain residual, so
that its output can take any sign (a block never ends with an activation that clips it).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unet.normalization import CheckpointSafeBatchNorm2d, SubBatchNorm2d

NormLayer = Callable[[int], nn.Module]  # builds a normalization layer for a channel count
NORMS = ("group", "batch", "subbatch")


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def norm_layer(kind: str = "group", groups: int = 8, subbatch_extrapolate: bool = False) -> NormLayer:
    """The model's normalization (section 6): ``group`` (GroupNorm with ``groups``), ``batch`` or ``subbatch``."""
    if kind == "group":
        return functools.partial(group_norm, groups=groups)
    if kind == "batch":
        return CheckpointSafeBatchNorm2d
    if kind == "subbatch":
        return functools.partial(SubBatchNorm2d, extrapolate=subbatch_extrapolate)
    raise ValueError(f"unknown normalization {kind!r}; valid: {', '.join(NORMS)}")


def _resolve_norm(norm_groups: int, norm: NormLayer | None) -> NormLayer:
    return norm if norm is not None else norm_layer("group", norm_groups)


class ConvNorm(nn.Sequential):
    """A 3x3 convolution followed by a normalization, with no activation (a linear layer)."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormLayer, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            norm(out_channels),
        )


class PartialSkipConv(nn.Module):
    """``act(x + norm(conv(x)))``: the partial skip of section 6.2, reabsorbed before the activation."""

    def __init__(self, channels: int, norm: NormLayer) -> None:
        super().__init__()
        self.conv = ConvNorm(channels, channels, norm)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv(x))


def residual_tail(channels: int, convs: int, norm: NormLayer) -> nn.Sequential:
    """``convs`` 3x3 convolutions: partial-skip units, then a final linear one (keeps the sign)."""
    layers: list[nn.Module] = [PartialSkipConv(channels, norm) for _ in range(convs - 1)]
    layers.append(ConvNorm(channels, channels, norm))
    return nn.Sequential(*layers)


class DownBlock(nn.Module):
    """Halves the resolution and changes the features: a stride-2 convolution, then a residual tail.

    ``convs`` counts every 3x3 convolution in the block (at least 2). ``norm`` builds each
    normalization (see :func:`norm_layer`); ``None``: GroupNorm with ``norm_groups`` groups.
    """

    def __init__(
        self, in_channels: int, out_channels: int, convs: int, norm_groups: int = 8, norm: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm = _resolve_norm(norm_groups, norm)
        self.down = ConvNorm(in_channels, out_channels, norm, stride=2)
        self.act = nn.SiLU()
        self.tail = residual_tail(out_channels, convs - 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.down(x))
        return y + self.tail(y)


class UpBlock(nn.Module):
    """Doubles the resolution, concatenates the encoder's features, then convolves.

    The upsampling is a transposed convolution plus a lossy skip of the input (a 1x1 projection,
    nearest-upsampled), so the block starts near a plain upsampling. The first convolution sees
    ``cat(upsampled, skip)``; an optional local-attention branch sees the same input and is added
    beside it. The upsampled tensor is the partial skip of that first convolution and the plain
    residual of the whole block. ``norm`` as in :class:`DownBlock`.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        convs: int,
        norm_groups: int = 8,
        local_attention: nn.Module | None = None,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _resolve_norm(norm_groups, norm)
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.lossy_skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.fuse = ConvNorm(out_channels + skip_channels, out_channels, norm)
        self.local_attention = local_attention
        self.act = nn.SiLU()
        self.tail = residual_tail(out_channels, convs - 1, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # A 1x1 convolution commutes with nearest upsampling: project at the low resolution (cheaper).
        upsampled = self.up(x) + F.interpolate(self.lossy_skip(x), scale_factor=2.0, mode="nearest")
        merged = torch.cat([upsampled, skip], dim=1)
        y = self.fuse(merged)
        if self.local_attention is not None:
            y = y + self.local_attention(merged)
        y = self.act(upsampled + y)
        return upsampled + self.tail(y)


def sincos_position_encoding_2d(
    height: int, width: int, channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Fixed 2D sin-cos position encoding, ``(height * width, channels)`` in row-major pixel order.

    A quarter of the channels each hold sin(y w), cos(y w), sin(x w), cos(x w) over geometric
    frequencies w, so it is defined for any input size (``channels`` must be divisible by 4).
    """
    if channels % 4:
        raise ValueError(f"channels must be divisible by 4 for a 2D sin-cos encoding, got {channels}")
    quarter = channels // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y_angles = ys.reshape(-1, 1) * omega
    x_angles = xs.reshape(-1, 1) * omega
    encoding = torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=1)
    return encoding.to(dtype) if dtype is not None else encoding


class GlobalSelfAttention2d(nn.Module):
    """Multi-head self-attention over every pixel of a feature map, with a 2D sin-cos position code."""

    def __init__(self, channels: int, heads: int, norm: NormLayer) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads must divide channels, got heads={heads} and channels={channels}")
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_encoding_2d(height, width, channels, x.device, x.dtype)
        qkv = self.qkv(tokens).view(batch, height * width, 3, self.heads, channels // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(attended.transpose(1, 2).reshape(batch, height * width, channels))
        return out.transpose(1, 2).reshape(batch, channels, height, width)


class BottleneckBlock(nn.Module):
    """``x + mlp(act(x + attention(x)))``: global attention with a partial skip, then a linear MLP.

    ``norm`` as in :class:`DownBlock`.
    """

    def __init__(
        self, channels: int, heads: int, mlp_ratio: float, norm_groups: int = 8, norm: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm = _resolve_norm(norm_groups, norm)
        hidden = max(1, round(channels * mlp_ratio))
        self.attention = GlobalSelfAttention2d(channels, heads, norm)
        self.act = nn.SiLU()
        self.mlp = nn.Sequential(
            norm(channels),
            nn.Conv2d(channels, hidden, 1),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.act(x + self.attention(x)))


class LocalFeatureNorm(nn.Module):
    """Per-pixel normalization over the channels with a learnable per-channel scale (section 6.5).

    Used on the label logits right before the softmax: the softmax ignores the removed mean, and a
    regular scale keeps its exponentials (and their gradients) tame.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32: under autocast, half-precision logits would lose the small differences.
        x32 = x.float()
        variance, mean = torch.var_mean(x32, dim=1, unbiased=False, keepdim=True)
        normalized = (x32 - mean) * torch.rsqrt(variance + self.eps) * self.weight.float().view(1, -1, 1, 1)
        return normalized.to(x.dtype)
