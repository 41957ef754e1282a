"""Readable plain-PyTorch local attention (section 7 of the paper); the fallback of the kernels.

It follows the paper step by step: pad H and W to multiples of the block size, gather for every
block the 3b x 3b window of keys made of the block and its 8 neighbours, mask keys outside the
image with -inf, add the relative-position bias through a precomputed index into the small
(4b-1)^2 table, softmax, weighted sum of values, crop. Everything is ordinary autograd.
"""

import torch
import torch.nn.functional as F

__all__ = ["local_attention2d_reference"]


def local_attention2d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor,
    block_size: int,
    scale: float,
    symmetric: bool = False,
) -> torch.Tensor:
    """Local attention of ``[B, H, W, heads, D]`` tensors; see :func:`localattn.local_attention2d`.

    Low-precision inputs are computed in float32 and the result is cast back, as the kernels do;
    a float32 ``rpb`` with float16/bfloat16 inputs (the dtype rule of ``local_attention2d``) is
    used unrounded and gets a float32 gradient.
    """
    batch, height, width, heads, dim = q.shape
    b = block_size
    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, rpb = (t.to(compute_dtype) for t in (q, k, v, rpb))
    pad_h, pad_w = -height % b, -width % b
    blocks_y, blocks_x = (height + pad_h) // b, (width + pad_w) // b

    queries = _query_blocks(q, b, pad_h, pad_w)  # [B, heads, nY, nX, b*b, D]
    keys = _key_windows(k, b, pad_h, pad_w)  # [B, heads, nY, nX, 9*b*b, D]
    values = _key_windows(v, b, pad_h, pad_w)
    inside = torch.ones(1, height, width, 1, 1, dtype=compute_dtype, device=q.device)
    key_inside = _key_windows(inside, b, pad_h, pad_w)[0, 0, ..., 0].bool()  # [nY, nX, 9*b*b]

    bias_index, within_block = _relative_position_index(b, q.device)  # [b*b, 9*b*b] each
    bias = rpb.flatten(1)[:, bias_index]  # [heads, b*b, 9*b*b]
    allowed = key_inside[:, :, None, :]  # [nY, nX, 1, 9*b*b]
    if symmetric:
        allowed = allowed & within_block

    scores = scale * queries @ keys.transpose(-1, -2) + bias[None, :, None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ values  # [B, heads, nY, nX, b*b, D]

    out = out.view(batch, heads, blocks_y, blocks_x, b, b, dim).permute(0, 2, 4, 3, 5, 1, 6)
    out = out.reshape(batch, blocks_y * b, blocks_x * b, heads, dim)
    return out[:, :height, :width].to(out_dtype)


def _query_blocks(t: torch.Tensor, b: int, pad_h: int, pad_w: int) -> torch.Tensor:
    """[B, H, W, heads, D] -> [B, heads, nY, nX, b*b, D], the pixels of each block."""
    t = F.pad(t, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    batch, height, width, heads, dim = t.shape
    t = t.view(batch, height // b, b, width // b, b, heads, dim)
    return t.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads, height // b, width // b, b * b, dim)


def _key_windows(t: torch.Tensor, b: int, pad_h: int, pad_w: int) -> torch.Tensor:
    """[B, H, W, heads, D] -> [B, heads, nY, nX, 9*b*b, D], each block with its 8 neighbours.

    Zero padding of one block on every side (plus the padding to a multiple of b) makes the
    windows of border blocks whole; the caller masks those padded keys.
    """
    t = F.pad(t, (0, 0, 0, 0, b, b + pad_w, b, b + pad_h))
    t = t.unfold(1, 3 * b, b).unfold(2, 3 * b, b)  # [B, nY, nX, heads, D, 3b, 3b]
    batch, blocks_y, blocks_x, heads, dim = t.shape[:5]
    return t.permute(0, 3, 1, 2, 5, 6, 4).reshape(batch, heads, blocks_y, blocks_x, 9 * b * b, dim)


def _relative_position_index(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index into the flattened (4b-1)^2 bias table, and the symmetric mask, per (query, key).

    A query at (i, j) inside its block and a key at (u, w) inside the 3b x 3b window are
    (u - b - i, w - b - j) apart; shifting by 2b-1 makes that a table coordinate.
    """
    query = torch.arange(b, device=device)
    key = torch.arange(3 * b, device=device)
    offset = key[None, :] - b - query[:, None]  # [b, 3b]: key minus query, one axis
    table = 4 * b - 1
    row = offset[:, None, :, None] + 2 * b - 1  # axes (i, j, u, w)
    col = offset[None, :, None, :] + 2 * b - 1
    index = (row * table + col).reshape(b * b, 9 * b * b)
    near = offset.abs() <= b
    within_block = (near[:, None, :, None] & near[None, :, None, :]).reshape(b * b, 9 * b * b)
    return index, within_block
