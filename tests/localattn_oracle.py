"""The dense oracle of the local attention op and its random inputs, shared by the localattn tests.

The oracle builds the full [H*W, H*W] score matrix from pixel coordinates, straight from the
contract in docs/local-attention.md, independently of the reference path and of the kernels'
tiling: every query against every pixel, the disallowed pairs masked out, the bias gathered by
offset. The tests import it by name (pytest puts tests/ on sys.path).
"""

import torch


def dense_local_attention(q, k, v, rpb, block_size, scale, symmetric):
    """(out, lse) of the contract, in float64, from a dense masked [H*W, H*W] attention."""
    batch, height, width, heads, dim = q.shape
    b, table = block_size, 4 * block_size - 1
    q, k, v, rpb = (t.double() for t in (q, k, v, rpb))
    ys, xs = torch.meshgrid(
        torch.arange(height, device=q.device), torch.arange(width, device=q.device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # [query, key]: key minus query
    visible = ((ys[None, :] // b - ys[:, None] // b).abs() <= 1) & (
        (xs[None, :] // b - xs[:, None] // b).abs() <= 1
    )
    if symmetric:
        visible &= (dy.abs() <= b) & (dx.abs() <= b)
    # Disallowed pairs may lie off the table: clamp their index, their score is -inf anyway.
    index = (dy + 2 * b - 1).clamp(0, table - 1) * table + (dx + 2 * b - 1).clamp(0, table - 1)
    bias = rpb.flatten(1)[:, index]  # [heads, N, N]

    def by_head(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    scores = scale * by_head(q) @ by_head(k).transpose(-1, -2) + bias
    scores = scores.masked_fill(~visible, float("-inf"))
    out = scores.softmax(-1) @ by_head(v)
    lse = scores.logsumexp(-1)
    return (
        out.transpose(1, 2).reshape(batch, height, width, heads, dim),
        lse.transpose(1, 2).reshape(batch, height, width, heads),
    )


def random_inputs(shape, block_size, dtype=torch.float64, rpb_dtype=None, requires_grad=False,
                  seed=0, device="cpu"):
    """q, k, v of ``shape`` [B, H, W, heads, D] and rpb [heads, 4b-1, 4b-1]: standard normal
    values drawn in float64 from one seeded generator, then cast (rpb to ``rpb_dtype``, by
    default ``dtype``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    table = 4 * block_size - 1

    def draw(size, dt):
        t = torch.randn(size, generator=generator, device=device, dtype=torch.float64).to(dt)
        return t.requires_grad_(requires_grad)

    q, k, v = (draw(shape, dtype) for _ in range(3))
    rpb = draw((shape[3], table, table), rpb_dtype or dtype)
    return q, k, v, rpb
