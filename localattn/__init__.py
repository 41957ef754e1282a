"""2D block local attention (paper, section 7): a fused C++/CUDA op with a plain-PyTorch fallback.

``local_attention2d`` is the functional op on ``[B, H, W, heads, D]`` tensors, ``LocalAttention2d``
the layer on ``(B, C, H, W)`` feature maps, ``local_attention2d_reference`` the readable reference.
The contract is docs/local-attention.md; the compiled ops and their registrations live in
``localattn.ops``.
"""

from .functional import FallbackWarning, kernel_available, local_attention2d
from .module import LocalAttention2d
from .reference import local_attention2d_reference

__all__ = ["FallbackWarning", "LocalAttention2d", "kernel_available", "local_attention2d", "local_attention2d_reference"]
