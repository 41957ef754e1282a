"""The compiled ops of localattn: loading, fake (meta) and autograd registrations, availability.

``localattn::local_attention2d_forward`` and ``_backward`` are defined in
csrc/localattn/local_attention.cpp (schemas), csrc/localattn/cpu (CPU kernels) and
csrc/localattn/cuda (CUDA kernels); their input contract is csrc/localattn/checks.h and
docs/local-attention.md. This module registers a fake implementation and an autograd formula
for them, as pytorch/extension-cpp does, so that they work under ``torch.compile``,
``torch.export`` and ``torch.autograd``; :mod:`localattn.functional` chooses between them and
the reference path.
"""

import torch

__all__ = ["CUDA_MAX_BLOCK_SIZE", "EXTENSION_ERROR", "KERNEL_DEVICES", "forward", "kernel_available"]

FORWARD_OP = "localattn::local_attention2d_forward"
BACKWARD_OP = "localattn::local_attention2d_backward"

try:
    from . import _C  # importing it registers the schemas and the kernels

    if not hasattr(_C, "KERNEL_DEVICES"):
        raise ImportError(
            "localattn._C was built from older sources (it has no KERNEL_DEVICES): rebuild it, "
            'e.g. pip install --no-build-isolation -e .'
        )
except ImportError as error:  # the pure-Python reference path still works
    EXTENSION_ERROR: ImportError | None = error
    KERNEL_DEVICES: frozenset[str] = frozenset()
    CUDA_MAX_BLOCK_SIZE = 0
else:
    EXTENSION_ERROR = None
    # The device types the extension was built with kernels for ("cpu", and "cuda" when its CUDA
    # sources were compiled), and the largest block size the CUDA kernels are instantiated for.
    # Constants read once, so the backend choice is a lookup that torch.compile traces without a
    # graph break.
    KERNEL_DEVICES = frozenset(_C.KERNEL_DEVICES)
    CUDA_MAX_BLOCK_SIZE = _C.CUDA_MAX_BLOCK_SIZE


def kernel_available(device: torch.device | str) -> bool:
    """Whether a compiled kernel of the op is registered for ``device``'s type."""
    return torch.device(device).type in KERNEL_DEVICES


def forward(q, k, v, rpb, block_size: int, scale: float, symmetric: bool) -> torch.Tensor:
    """The output of the compiled forward (differentiable); contiguous inputs expected."""
    out, _lse = torch.ops.localattn.local_attention2d_forward(q, k, v, rpb, block_size, scale, symmetric)
    return out


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(q, k, v, rpb, block_size, scale, symmetric):
    return torch.empty_like(q), q.new_empty(q.shape[:4], dtype=_lse_dtype(q.dtype))


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


if EXTENSION_ERROR is None:
    torch.library.register_fake(FORWARD_OP, _forward_fake)
    torch.library.register_fake(BACKWARD_OP, _backward_fake)
    torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)
