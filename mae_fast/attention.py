"""Self-attention for every encoder and decoder block: one function, several backends.

``attend(qkv, num_heads, scale)`` takes the qkv projection (B, M, 3*C) and returns (B, M, C).
Backends: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention on BHMK) and ``math``
(the reference softmax(q k^T * scale) v, the only one that can return the attention weights).
"""
import torch
import torch.nn.functional as F

from . import reference
from .backends import Choice, register_chooser

ATTN_BACKENDS = ("auto", "sdpa", "math")


def _choose(device: torch.device, backend: str) -> Choice:
    if backend in ("reference", "math"):
        return Choice("attention", "math", f"backend={backend!r} asked for")
    return Choice("attention", "sdpa", "torch SDPA runs on every device")


register_chooser("attention", _choose)


def _split_heads(qkv, num_heads):
    B, M, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, M, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # q, k, v: (B, H, M, K)


def attend(qkv, num_heads: int, scale: float, *, backend: str = "auto", return_attn: bool = False):
    """qkv (B, M, 3*C) -> out (B, M, C) [, attn (B, H, M, M) with return_attn]."""
    from .backends import choose

    B, M, _ = qkv.shape
    impl = "math" if return_attn else choose("attention", qkv.device, backend).impl
    q, k, v = _split_heads(qkv, num_heads)
    if impl == "math":
        out, attn = reference.attention(q, k, v, scale)
    else:
        out, attn = F.scaled_dot_product_attention(q, k, v, scale=scale), None
    out = out.transpose(1, 2).reshape(B, M, -1)
    return (out, attn) if return_attn else out
