"""Functional 2D block local attention: the public API, its input checks and the backend choice.

The compiled kernels and their registrations are in :mod:`localattn.ops`, the plain-PyTorch
reference in :mod:`localattn.reference`; the contract all of them follow is
docs/local-attention.md (and, for the kernels, csrc/localattn/checks.h).
"""

import warnings

import torch

from . import ops
from .ops import kernel_available
from .reference import local_attention2d_reference

__all__ = ["FallbackWarning", "bias_dtype_allowed", "kernel_available", "local_attention2d"]

BACKENDS = ("auto", "kernel", "reference")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)

# The fallback reasons already warned about (FallbackWarning comes once per reason).
_warned_reasons: set[str] = set()


class FallbackWarning(UserWarning):
    """``backend="auto"`` took the reference path because no compiled kernel can serve a call."""


def bias_dtype_allowed(q_dtype: torch.dtype, rpb_dtype: torch.dtype) -> bool:
    """The ``rpb`` dtype rule: the dtype of ``q``, or float32 when ``q`` is float16/bfloat16."""
    return rpb_dtype == q_dtype or (rpb_dtype == torch.float32 and q_dtype in REDUCED_DTYPES)


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

    The full contract (bias indexing, masking, backward, memory roofline) is
    docs/local-attention.md.

    Args:
        q, k, v: queries, keys, values: one shape, head size ``D >= 1``, one device, and one
            dtype among float16, bfloat16, float32, float64.
        rpb: relative-position bias table on the device of ``q``, in the dtype of ``q`` or, when
            ``q`` is float16/bfloat16, in float32 (a float32 master table: it is used unrounded
            and its gradient comes back in float32).
        block_size: the block size ``b >= 1``.
        scale: score scale, ``D ** -0.5`` by default.
        symmetric: also drop keys more than ``b`` pixels away along either axis.
        backend: ``"auto"`` uses the compiled kernel when one can serve the call and otherwise
            the plain-PyTorch reference, with a :class:`FallbackWarning` once per reason (no
            kernel for the device; block size above the CUDA kernels' 4); during
            ``torch.onnx.export`` it takes the reference path, which exports as standard ONNX ops.
            ``"kernel"`` requires the kernel (RuntimeError where none can serve the call);
            ``"reference"`` forces the reference.

    Raises:
        TypeError: a tensor argument that is not a tensor or has a wrong dtype, a non-int
            ``block_size``.
        ValueError: wrong shapes or devices, ``D == 0``, ``block_size < 1``, an unknown backend.
    """
    _check_inputs(q, k, v, rpb, block_size, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_kernel(q.device, block_size, backend):
        return ops.forward(
            q.contiguous(), k.contiguous(), v.contiguous(), rpb.contiguous(),
            block_size, float(scale), bool(symmetric),
        )
    return local_attention2d_reference(q, k, v, rpb, block_size, float(scale), bool(symmetric))


def _use_kernel(device: torch.device, block_size: int, backend: str) -> bool:
    if backend == "reference":
        return False
    # ONNX has no translation of the compiled op: exporting traces the reference path instead,
    # whose standard ops onnxruntime runs (torch.export, by contrast, keeps the custom op).
    if backend == "auto" and torch.onnx.is_in_onnx_export():
        return False
    reason = _why_no_kernel(device, block_size)
    if reason is None:
        return True
    if backend == "kernel":
        raise RuntimeError(f"local_attention2d: backend='kernel' but no compiled kernel can serve this call: {reason}")
    _warn_fallback(reason)
    return False


def _why_no_kernel(device: torch.device, block_size: int) -> str | None:
    """Why no compiled kernel can serve a call on ``device`` with ``block_size``, or None."""
    if ops.EXTENSION_ERROR is not None:
        return f"importing localattn._C failed ({ops.EXTENSION_ERROR})"
    if device.type not in ops.KERNEL_DEVICES:
        return f"localattn._C has kernels for {sorted(ops.KERNEL_DEVICES)}, not for device type {device.type!r}"
    if device.type == "cuda" and block_size > ops.CUDA_MAX_BLOCK_SIZE:
        return f"the CUDA kernels serve block sizes up to {ops.CUDA_MAX_BLOCK_SIZE}"
    return None


def _warn_fallback(reason: str) -> None:
    # warnings.warn would break a torch.compile graph: compiled code falls back silently.
    if torch.compiler.is_compiling() or reason in _warned_reasons:
        return
    _warned_reasons.add(reason)
    warnings.warn(
        f"local_attention2d: {reason}; using the plain-PyTorch reference path instead, which is "
        "slower and keeps the attention weights of every block for the backward "
        "(warned once per reason)",
        FallbackWarning,
        stacklevel=4,
    )


def _check_inputs(q, k, v, rpb, block_size, backend) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v), ("rpb", rpb)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"local_attention2d: {name} must be a Tensor, got {type(tensor).__name__}")
    if q.dtype not in DTYPES:
        raise TypeError(
            f"local_attention2d: q must be floating point (float16, bfloat16, float32 or float64), got {q.dtype}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"local_attention2d: block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"local_attention2d: block_size must be >= 1, got {block_size}")
    if backend not in BACKENDS:
        raise ValueError(f"local_attention2d: backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 5:
        raise ValueError(f"local_attention2d: q must be [B, H, W, heads, D], got shape {tuple(q.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"local_attention2d: the head size D (last dim of q) must be >= 1, got shape {tuple(q.shape)}")
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
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"local_attention2d: {name} must have the dtype of q {q.dtype}, got {tensor.dtype}")
    if not bias_dtype_allowed(q.dtype, rpb.dtype):
        raise TypeError(
            f"local_attention2d: rpb must have the dtype of q {q.dtype} (or float32 when q is "
            f"float16/bfloat16), got {rpb.dtype}"
        )
    for name, tensor in (("k", k), ("v", v), ("rpb", rpb)):
        if tensor.device != q.device:
            raise ValueError(f"local_attention2d: {name} must be on the device of q {q.device}, got {tensor.device}")
