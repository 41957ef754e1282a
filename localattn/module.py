"""``LocalAttention2d``: 2D block local attention over a feature map (paper, section 7)."""

import torch
import torch.nn.functional as F
from torch import nn

from .functional import BACKENDS, DTYPES, bias_dtype_allowed, local_attention2d

__all__ = ["LocalAttention2d"]


class LocalAttention2d(nn.Module):
    """Multi-head 2D block local attention with a learned relative-position bias.

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` for any ``H, W``: 1x1 q/k/v
    projections, :func:`localattn.local_attention2d` (each pixel attends to the 3b x 3b window of
    its block and the 8 neighbouring blocks, keys outside the image masked), 1x1 output
    projection. The 1x1 projections are ``Linear`` layers applied to the channels-last view of
    the input, so a ``channels_last`` input needs no copy; the output is channels-last in memory.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (default ``in_channels``).
        heads: attention heads.
        head_dim: channels per head (default ``in_channels // heads``).
        block_size: the block size ``b``; the bias table is ``[heads, 4b-1, 4b-1]``.
        symmetric: drop keys more than ``b`` pixels away along either axis.
        qkv_bias: learn a bias in the q/k/v projection.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``, see :func:`local_attention2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        heads: int = 4,
        head_dim: int | None = None,
        block_size: int = 2,
        symmetric: bool = False,
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("heads", heads), ("block_size", block_size)):
            _check_positive_int(name, value)
        if head_dim is None:
            if in_channels % heads:
                raise ValueError(
                    f"LocalAttention2d: heads={heads} must divide in_channels={in_channels} "
                    "when head_dim is not given"
                )
            head_dim = in_channels // heads
        _check_positive_int("head_dim", head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"LocalAttention2d: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.heads, self.head_dim, self.block_size = heads, head_dim, block_size
        self.symmetric, self.backend = symmetric, backend
        inner = heads * head_dim
        self.qkv = nn.Linear(in_channels, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_channels)
        table = 4 * block_size - 1
        self.relative_position_bias = nn.Parameter(torch.empty(heads, table, table))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LocalAttention2d: x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise TypeError(
                "LocalAttention2d: x must be floating point (float16, bfloat16, float32 or float64), "
                f"got dtype {x.dtype}"
            )
        if x.dim() != 4:
            raise ValueError(f"LocalAttention2d: expected a (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"LocalAttention2d: expected {self.in_channels} input channels, got {x.shape[1]}"
            )
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous for channels_last x
        # One projection per q, k, v (row slices of one weight) so each comes out contiguous.
        biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
        q, k, v = (
            F.linear(pixels, weight, bias).unflatten(-1, (self.heads, self.head_dim))
            for weight, bias in zip(self.qkv.weight.chunk(3), biases)
        )
        out = local_attention2d(
            q, k, v, self._bias_table(q.dtype), self.block_size,
            symmetric=self.symmetric, backend=self.backend,
        )
        return self.proj(out.flatten(-2)).permute(0, 3, 1, 2)

    def _bias_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias table for queries of ``dtype``: the parameter itself where the op accepts its
        dtype (a float32 table under bf16/fp16 autocast is used unrounded and its gradient
        summed in float32), else a copy cast to ``dtype``."""
        table = self.relative_position_bias
        return table if bias_dtype_allowed(dtype, table.dtype) else table.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, heads={self.heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, symmetric={self.symmetric}, backend={self.backend!r}"
        )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LocalAttention2d: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"LocalAttention2d: {name} must be >= 1, got {value}")
