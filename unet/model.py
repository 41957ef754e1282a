"""The attention UNet of the paper: encoder, global-attention bottleneck, decoder, two heads.

Shapes (``L`` labels, ``d`` = ``config.depth``, ``w_i = base_features * 2**i``)::

    image (B, in_channels, H, W)
      encoder: d DownBlocks, block i -> (B, w_i, H / 2**(i+1), W / 2**(i+1))
      bottleneck: bottleneck_blocks global-attention blocks at (B, w_{d-1}, H / 2**d, W / 2**d)
      decoder: d UpBlocks; decoder level l (0 = nearest the bottleneck, d-1 = full resolution)
               works at H / 2**(d-1-l) and concatenates encoder block d-2-l's output
               (the last level concatenates the input image itself)
      heads: label logits (B, L, H, W) after local feature normalization; boundary logit (B, 1, H, W)

``local_attention_levels`` names decoder levels in that numbering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unet.blocks import NORMS, BottleneckBlock, DownBlock, LocalFeatureNorm, UpBlock, norm_layer
from unet.checks import check_int
from unet.labels import NUM_LABELS


class SegmentationOutput(NamedTuple):
    label_logits: torch.Tensor  # (B, L, H, W)
    boundary_logits: torch.Tensor  # (B, 1, H, W)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`AttentionUNet`; plain data, JSON round-trippable."""

    in_channels: int = 3
    num_labels: int = NUM_LABELS
    base_features: int = 16  # features after the first down block; doubled by each later one
    depth: int = 3  # number of down blocks (= up blocks); inputs must be divisible by 2**depth
    bottleneck_blocks: int = 1
    heads: int = 4  # attention heads of the bottleneck
    mlp_ratio: float = 2.0  # hidden width of the bottleneck MLP, relative to its features
    convs_per_block: int = 2  # 3x3 convolutions in each down and up block
    norm_groups: int = 8  # GroupNorm groups (the largest divisor of a width not above this)
    norm: str = "group"  # "group", "batch" or "subbatch" (unet.normalization); label logits keep their own norm
    subbatch_extrapolate: bool = False  # norm="subbatch": extrapolate the previous steps' statistics
    local_attention_levels: tuple[int, ...] = ()  # decoder levels, 0 = nearest the bottleneck
    local_attention_block_size: int = 2
    local_attention_heads: int = 4
    grad_checkpointing: bool = False
    image_size: int = 128  # the nominal training size of a preset (any multiple of 2**depth works)

    def __post_init__(self) -> None:
        minimums = dict.fromkeys(("in_channels", "num_labels", "base_features", "depth", "heads", "norm_groups",
                                  "local_attention_block_size", "local_attention_heads", "image_size"), 1)
        minimums.update(bottleneck_blocks=0, convs_per_block=2)
        for name, minimum in minimums.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum))
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not isinstance(self.subbatch_extrapolate, bool):
            raise ValueError(f"subbatch_extrapolate must be a bool, got {self.subbatch_extrapolate!r}")
        if self.subbatch_extrapolate and self.norm != "subbatch":
            raise ValueError(f"subbatch_extrapolate needs norm='subbatch', got norm={self.norm!r}")
        object.__setattr__(self, "local_attention_levels", tuple(self.local_attention_levels))
        for level in self.local_attention_levels:
            if not isinstance(level, int) or not 0 <= level < self.depth:
                raise ValueError(
                    f"local_attention_levels must hold decoder levels in [0, depth={self.depth}), "
                    f"got {self.local_attention_levels!r}"
                )
        widest = self.widths[-1]
        if self.bottleneck_blocks and (widest % self.heads or widest % 4):
            raise ValueError(
                f"the bottleneck width {widest} must be divisible by heads={self.heads} and by 4 "
                "(for the 2D sin-cos position code)"
            )
        if self.image_size % self.input_multiple:
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**depth={self.input_multiple}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Feature widths of the down blocks, from the first to the bottleneck."""
        return tuple(self.base_features * 2**i for i in range(self.depth))

    @property
    def input_multiple(self) -> int:
        return 2**self.depth

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["local_attention_levels"] = list(self.local_attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        unknown = set(d) - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}; valid fields: {sorted(_CONFIG_FIELDS)}")
        return cls(**d)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(UNetConfig))


PRESETS: dict[str, UNetConfig] = {
    # Section 3: 3x512x512 -> 96 features after the first block, doubling to 1536 at 16x16.
    "paper": UNetConfig(
        base_features=96, depth=5, bottleneck_blocks=2, heads=16, convs_per_block=3, norm_groups=32, image_size=512
    ),
    "small": UNetConfig(base_features=32, depth=4, bottleneck_blocks=2, heads=8, norm_groups=8, image_size=256),
    # Trains usefully on a couple of CPU cores at 64x64 to 128x128.
    "tiny": UNetConfig(base_features=16, depth=3, bottleneck_blocks=1, heads=4, norm_groups=8, image_size=128),
}


class AttentionUNet(nn.Module):
    """Encoder, global-attention bottleneck and decoder; returns label and boundary logits."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        widths = config.widths
        norm = norm_layer(config.norm, config.norm_groups, config.subbatch_extrapolate)
        encoder_inputs = (config.in_channels,) + widths[:-1]
        self.encoder = nn.ModuleList(
            DownBlock(cin, cout, config.convs_per_block, norm=norm) for cin, cout in zip(encoder_inputs, widths)
        )
        self.bottleneck = nn.Sequential(
            *(
                BottleneckBlock(widths[-1], config.heads, config.mlp_ratio, norm=norm)
                for _ in range(config.bottleneck_blocks)
            )
        )
        # Decoder level l outputs the width of the encoder level it meets; the last level keeps w_0.
        skip_widths = encoder_inputs[::-1]
        out_widths = widths[:-1][::-1] + (widths[0],)
        in_widths = (widths[-1],) + out_widths[:-1]
        self.decoder = nn.ModuleList(
            UpBlock(
                cin, cskip, cout, config.convs_per_block, norm=norm,
                local_attention=self._local_attention(level, cin=cout + cskip, cout=cout),
            )
            for level, (cin, cskip, cout) in enumerate(zip(in_widths, skip_widths, out_widths))
        )
        self.label_head = nn.Conv2d(widths[0], config.num_labels, 1)
        self.label_norm = LocalFeatureNorm(config.num_labels)
        self.boundary_head = nn.Conv2d(widths[0], 1, 1)

    def _local_attention(self, level: int, cin: int, cout: int) -> nn.Module | None:
        if level not in self.config.local_attention_levels:
            return None
        try:  # imported lazily: the model builds and runs without localattn when it is off
            from localattn import LocalAttention2d
        except ImportError as error:
            raise ImportError(
                f"local_attention_levels={self.config.local_attention_levels} needs localattn.LocalAttention2d, "
                f"which could not be imported: {error}"
            ) from error
        heads = self.config.local_attention_heads
        return LocalAttention2d(
            cin, cout, heads=heads, head_dim=max(1, cout // heads), block_size=self.config.local_attention_block_size
        )

    @property
    def input_multiple(self) -> int:
        """Input heights and widths must be divisible by this (the total downsampling)."""
        return self.config.input_multiple

    @property
    def grad_checkpointing(self) -> bool:
        return self.config.grad_checkpointing

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.config = dataclasses.replace(self.config, grad_checkpointing=bool(enabled))

    def _run(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must have shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise ValueError(
                f"input height and width must be divisible by {self.input_multiple} (2**depth), got {height}x{width}"
            )

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        self._check_input(x)
        skips = [x]
        h = x
        for block in self.encoder:
            h = self._run(block, h)
            skips.append(h)
        skips.pop()  # the deepest encoder output feeds the bottleneck, not a skip
        h = self._run(self.bottleneck, h)  # tiny at 1/2**depth of the input: one checkpoint is enough
        for block in self.decoder:
            h = self._run(block, h, skips.pop())
        return SegmentationOutput(self.label_norm(self.label_head(h)), self.boundary_head(h))


def to_probabilities(output: SegmentationOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Label probabilities (softmax over labels) and boundary probability (sigmoid)."""
    return F.softmax(output.label_logits, dim=1), torch.sigmoid(output.boundary_logits)


def build_model(preset: str = "tiny", **overrides: Any) -> AttentionUNet:
    """An :class:`AttentionUNet` from a preset name, with any config fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    unknown = set(overrides) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}; valid fields: {sorted(_CONFIG_FIELDS)}")
    return AttentionUNet(dataclasses.replace(PRESETS[preset], **overrides))
