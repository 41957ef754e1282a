"""The dense oracle of the local attention op and its random inputs, shared by the localattn tests.

The oracle builds the full [H*W, H*W] score matrix from pixel coordinates, straight from the
contract in docs/local-attention.md, independently of the reference path and of the kernels'
tiling: every query against every pixel, the disallowed pairs masked out, the bias gathered by
offset. The tests import it by name (pytest puts tests/ on sys.path).
"""

import torch


def _pairs(height, width, b, symmetric, device):
    """For every [query, key] pair of pixels: the flat bias-table index of its offset, and whether
    the key is attended (same or neighbouring block, in the image, symmetric mask)."""
    table = 4 * b - 1
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # key minus query
    visible = ((ys[None, :] // b - ys[:, None] // b).abs() <= 1) & (
        (xs[None, :] // b - xs[:, None] // b).abs() <= 1
    )
    if symmetric:
        visible &= (dy.abs() <= b) & (dx.abs() <= b)
    # Disallowed pairs may lie off the table: clamp their index, their score is -inf anyway.
    index = (dy + 2 * b - 1).clamp(0, table - 1) * table + (dx + 2 * b - 1).clamp(0, table - 1)
    return index, visible


def dense_local_attention(q, k, v, rpb, block_size, scale, symmetric):
    """(out, lse) of the contract, in float64, from a dense masked [H*W, H*W] attention."""
    batch, height, width, heads, dim = q.shape
    q, k, v, rpb = (t.double() for t in (q, k, v, rpb))
    index, visible = _pairs(height, width, block_size, symmetric, q.device)
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


def unit_roundoff(dtype):
    """u = 2^-p for a dtype with p significand bits: rounding to nearest errs by at most u|x|."""
    return torch.finfo(dtype).eps / 2


def _gamma(n, u):
    """gamma_n = n u / (1 - n u): a sum of n terms, in any order, errs by at most gamma_n times the
    sum of their absolute values (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    return n * u / (1 - n * u)


def rounding_error_bounds(q, k, v, rpb, grad_out, block_size, scale, symmetric, *,
                          accumulate_u, store_u, rpb_u):
    """Elementwise bounds on how far a computation of the op in floating point may lie from the
    exact result: {"out", "lse", "grad_q", "grad_k", "grad_v", "grad_rpb"} -> tensor.

    The computation is the kernels': scores, softmax and sums with unit roundoff `accumulate_u`,
    summed in any order (atomics included), results rounded once to unit roundoff `store_u`
    (`rpb_u` for grad_rpb). First-order bounds, each term a standard one: a sum of n terms errs by
    gamma_n times the sum of the absolute values of its terms; exp and log by 4u (2 ulp, CUDA's
    bound for expf); a product or quotient by u. Evaluated in float64 from the data:

    * scores s = scale <q, k> + bias: ds = gamma_{D+3} (scale |q|.|k| + |bias|);
    * probabilities p = exp(s - max) / sum: relative error e + sum_l p_l e_l + gamma_{n+2}, with
      e = ds + u (|s - max| + 4) and n = 9b^2 the window;
    * out = sum_j p_j v_j: sum_j |dp_j| |v_j| + gamma_n sum_j p_j |v_j|, plus storing it;
    * lse = max + log(sum): sum_l p_l e_l + gamma_n + 4u |lse - max|, plus u |lse|;
    * backward: delta = <dO, O> with the stored O; p = exp(s - lse) recomputed (relative error
      ds + dlse + u (|s - lse| + 4)); dS = p (<dO, v> - delta); then dq, dk (scale sum dS k,
      scale sum dS q), dv (sum p dO) and grad_rpb (the sum of dS over the batch and every
      query-key pair at that offset) are sums whose bounds add the propagated errors of their
      terms and gamma_(number of terms) times the sum of their absolute values.
    """
    batch, height, width, heads, dim = q.shape
    b, table = block_size, 4 * block_size - 1
    window = 9 * b * b
    ua, us = accumulate_u, store_u
    q, k, v, rpb, grad_out = (t.double() for t in (q, k, v, rpb, grad_out))
    index, visible = _pairs(height, width, b, symmetric, q.device)
    bias = rpb.flatten(1)[:, index]  # [heads, N, N]

    def by_head(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    def to_pixels(t):
        return t.transpose(1, 2).reshape(batch, height, width, heads, dim)

    Q, K, V, dO = (by_head(t) for t in (q, k, v, grad_out))
    s = (scale * Q @ K.transpose(-1, -2) + bias).masked_fill(~visible, float("-inf"))
    p = s.softmax(-1)
    out, lse, row_max = p @ V, s.logsumexp(-1), s.amax(-1)

    def on_visible(t):  # 0 for pairs that are not attended (their p is 0 too)
        return t.masked_fill(~visible, 0.0)

    ds = on_visible(_gamma(dim + 3, ua) * (scale * Q.abs() @ K.abs().transpose(-1, -2) + bias.abs()))
    e = on_visible(ds + ua * ((s - row_max[..., None]).abs() + 4))
    pe = p * e
    pv = p @ V.abs()
    out_bound = pe @ V.abs() + (pe.sum(-1, keepdim=True) + _gamma(2 * window + 2, ua)) * pv
    out_bound = out_bound + us * out.abs()
    lse_bound = pe.sum(-1) + _gamma(window, ua) + 4 * ua * (lse - row_max).abs() + ua * lse.abs()

    delta = (dO * out).sum(-1, keepdim=True)
    delta_bound = (_gamma(dim, ua) * (dO.abs() * out.abs()) + dO.abs() * out_bound).sum(-1, keepdim=True)
    p_error = p * on_visible(ds + lse_bound[..., None] + ua * ((s - lse[..., None]).abs() + 4))
    d_p = dO @ V.transpose(-1, -2)
    grad_s = p * (d_p - delta)
    grad_s_bound = (p_error + 2 * ua * p) * (d_p - delta).abs() + p * (
        _gamma(dim, ua) * dO.abs() @ V.abs().transpose(-1, -2) + delta_bound
    )
    grad_q = scale * grad_s @ K
    grad_q_bound = scale * (grad_s_bound @ K.abs() + _gamma(window, ua) * grad_s.abs() @ K.abs())
    grad_k = scale * grad_s.transpose(-1, -2) @ Q
    grad_k_bound = scale * (grad_s_bound.transpose(-1, -2) @ Q.abs()
                            + _gamma(window, ua) * grad_s.abs().transpose(-1, -2) @ Q.abs())
    grad_v = p.transpose(-1, -2) @ dO
    grad_v_bound = (p_error.transpose(-1, -2) @ dO.abs()
                    + _gamma(window, ua) * p.transpose(-1, -2) @ dO.abs())

    def per_offset(t):  # [B, heads, N, N] summed over batch and pairs into [heads, T, T]
        sums = torch.zeros(heads, table * table, dtype=t.dtype, device=t.device)
        sums.index_add_(1, index[visible], t.sum(0)[:, visible])
        return sums.view(heads, table, table)

    terms = per_offset(visible.expand(batch, heads, -1, -1).double())
    grad_rpb = per_offset(grad_s)
    grad_rpb_bound = (per_offset(grad_s_bound) + _gamma(terms, ua) * per_offset(grad_s.abs())
                      + rpb_u * grad_rpb.abs())
    return {
        "out": to_pixels(out_bound),
        "lse": lse_bound.transpose(1, 2).reshape(batch, height, width, heads),
        "grad_q": to_pixels(grad_q_bound + (ua + us) * grad_q.abs()),
        "grad_k": to_pixels(grad_k_bound + (ua + us) * grad_k.abs()),
        "grad_v": to_pixels(grad_v_bound + us * grad_v.abs()),
        "grad_rpb": grad_rpb_bound,
    }


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
