"""Functional 2D block local attention: input checks, op registration, backend choice.

The compiled ops ``localattn::local_attention2d_forward`` / ``_backward`` (schemas in
csrc/localattn/local_attention.cpp, CPU kernels in csrc/localattn/cpu, CUDA kernels in
csrc/localattn/cuda) get a fake (meta) implementation and an autograd formula here, following
pytorch's extension-cpp, so they work under ``torch.compile`` and ``torch.autograd``.
"""

import torch

from .reference import local_attention2d_reference

__all__ = ["local_attention2d", "kernel_available"]

FORWARD_OP = "localattn::local_attention2d_forward"
BACKWARD_OP = "localattn::local_attention2d_backward"
BACKENDS = ("auto", "kernel", "reference")

try:
    from . import _C  # noqa: F401  (importing it registers the schemas and kernels)
except ImportError as error:  # the pure-Python fallback still works
    _EXTENSION_ERROR: ImportError | None = error
else:
    _EXTENSION_ERROR = None


def _devices_with_kernels() -> frozenset[str]:
    """Device types ("cpu", "cuda") for which both ops have a compiled kernel registered."""
    if _EXTENSION_ERROR is not None:
        return frozenset()
    return frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if all(
            torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
            for op in (FORWARD_OP, BACKWARD_OP)
        )
    )


# Computed once at import (all registrations happen when _C is imported), so that the backend
# choice below is a constant lookup that torch.compile traces without a graph break.
_KERNEL_DEVICES = _devices_with_kernels()


def kernel_available(device: torch.device | str) -> bool:
    """Whether a compiled kernel of the op is registered for ``device``'s type."""
    return torch.device(device).type in _KERNEL_DEVICES


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _EXTENSION_ERROR is None:

    @torch.library.register_fake(FORWARD_OP)
    def _forward_fake(q, k, v, rpb, block_size, scale, symmetric):
        return torch.empty_like(q), q.new_empty(q.shape[:4], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(BACKWARD_OP)
    def _backward_fake(grad_out, q, k, v, rpb, out, lse, block_size, scale, symmetric):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(rpb)

    def _setup_context(ctx, inputs, output):
        q, k, v, rpb, block_size, scale, symmetric = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.block_size, ctx.scale, ctx.symmetric = block_size, scale, symmetric
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_rpb = torch.ops.localattn.local_attention2d_backward(
            grad_out.contiguous(), q, k, v, rpb, out, lse, ctx.block_size, ctx.scale, ctx.symmetric
        )
        return grad_q, grad_k, grad_v, grad_rpb, None, None, None

    torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)


def local_attention2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    symmetric: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """2D block local attention with a learned relative-position bias (paper, section 7).

    Layout: ``q``, ``k``, ``v`` are ``[B, H, W, heads, D]`` (what a channels-last projection
    gives without a copy); ``rpb`` is ``[heads, 4b-1, 4b-1]``; the result is ``[B, H, W, heads, D]``.
    Any ``H, W >= 1`` works: keys outside the image are absent (the same as padding to a multiple
    of ``b``, masking the padding with -inf and cropping).

    Query ``(y, x)`` lies in block ``(y//b, x//b)`` and sees the keys ``(y', x')`` inside the image
    whose blocks are that block or one of its 8 neighbours (a 3b x 3b window); with
    ``symmetric=True`` only those with ``|y'-y| <= b`` and ``|x'-x| <= b``. Then::

        s = scale * <q[y,x], k[y',x']> + rpb[h, y'-y + 2b-1, x'-x + 2b-1]
        out[y,x] = sum over keys of softmax(s) * v[y',x']

    Args:
        q, k, v: queries, keys, values, same shape, floating dtype and device.
        rpb: relative-position bias table of the dtype and device of ``q``.
        block_size: the block size ``b >= 1``.
        scale: score scale, ``D ** -0.5`` by default.
        symmetric: also drop keys more than ``b`` pixels away along either axis.
        backend: ``"auto"`` uses the compiled kernel when one is registered for the device of
            ``q`` and the plain-PyTorch reference otherwise; ``"kernel"`` requires the kernel;
            ``"reference"`` forces the reference.
    """
    _check_inputs(q, k, v, rpb, block_size, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_kernel(q.device, backend):
        out, _ = torch.ops.localattn.local_attention2d_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), rpb.contiguous(),
            block_size, float(scale), bool(symmetric),
        )
        return out
    return local_attention2d_reference(q, k, v, rpb, block_size, float(scale), bool(symmetric))


def _use_kernel(device: torch.device, backend: str) -> bool:
    if backend == "reference":
        return False
    available = device.type in _KERNEL_DEVICES
    if backend == "kernel" and not available:
        reason = f" (importing localattn._C failed: {_EXTENSION_ERROR})" if _EXTENSION_ERROR else ""
        raise RuntimeError(f"local_attention2d: no compiled kernel for device {device}{reason}")
    return available


def _check_inputs(q, k, v, rpb, block_size, backend) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v), ("rpb", rpb)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"local_attention2d: {name} must be a Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"local_attention2d: {name} must be floating point, got {tensor.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"local_attention2d: block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"local_attention2d: block_size must be >= 1, got {block_size}")
    if backend not in BACKENDS:
        raise ValueError(f"local_attention2d: backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 5:
        raise ValueError(f"local_attention2d: q must be [B, H, W, heads, D], got shape {tuple(q.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(
                f"local_attention2d: {name} must have the shape of q {tuple(q.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    table = 4 * block_size - 1
    expected = (q.shape[3], table, table)
    if tuple(rpb.shape) != expected:
        raise ValueError(
            f"local_attention2d: rpb must be [heads, 4b-1, 4b-1] = {expected}, got {tuple(rpb.shape)}"
        )
    for name, tensor in (("k", k), ("v", v), ("rpb", rpb)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"local_attention2d: {name} must have the dtype of q {q.dtype}, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"local_attention2d: {name} must be on the device of q {q.device}, got {tensor.device}")
