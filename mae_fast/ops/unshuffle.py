"""Decoder input: unshuffle-scatter of kept tokens and mask tokens into the full sequence,
plus the decoder positional table.

Fast path: ``torch.ops.mae_fast.unshuffle_scatter`` from the C++/CUDA extension ``mae_fast._C``
(``csrc/unshuffle.cpp``, ``csrc/cuda/unshuffle_kernels.cu``): one pass forward, one pass backward
(plus a small fixed-order reduction for ``grad_mask_token``), instead of the official
repeat / cat / gather / cat / add and their backwards. This module gives the op its fake
(shape) implementation and its autograd formula, extension-cpp style. Without ``_C`` the
reference runs.
"""
import functools

import torch

from .. import _ext, reference
from ..backends import choose, register_fast

OP = "unshuffle"


register_fast(OP, "c++", functools.partial(_ext.probe, "unshuffle_scatter"))


if _ext.has_op("unshuffle_scatter"):

    @torch.library.register_fake("mae_fast::unshuffle_scatter")
    def _unshuffle_scatter_fake(x, mask_token, ids_restore, pos_embed=None, len_decode=-1):
        torch._check(x.dim() == 3 and ids_restore.dim() == 2,
                     lambda: "mae_fast.unshuffle_scatter: x must be (N, 1+K, D), ids_restore (N, L)")
        for name, t in (("mask_token", mask_token), ("ids_restore", ids_restore), ("pos_embed", pos_embed)):
            torch._check(t is None or t.device == x.device,
                         lambda: f"mae_fast.unshuffle_scatter: {name} is on {t.device}, x on {x.device}")
        rows = ids_restore.shape[1] if len_decode < 0 else x.shape[1] - 1 + len_decode
        return x.new_empty((x.shape[0], rows + 1, x.shape[2]))

    @torch.library.register_fake("mae_fast::unshuffle_scatter_backward")
    def _unshuffle_scatter_backward_fake(grad_out, ids_restore, len_keep, len_decode=-1):
        grad_x = grad_out.new_empty((grad_out.shape[0], len_keep + 1, grad_out.shape[2]))
        grad_mask_token = grad_out.new_empty((1, 1, grad_out.shape[2]))
        return grad_x, grad_mask_token

    def _setup_context(ctx, inputs, output):
        x, _mask_token, ids_restore = inputs[:3]
        ctx.save_for_backward(ids_restore)
        ctx.len_keep = x.shape[1] - 1
        ctx.len_decode = inputs[4] if len(inputs) > 4 else -1

    def _backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        # pos_embed=None / len_decode=-1 may be left out of the inputs (the schema's defaults)
        num_inputs = len(ctx.needs_input_grad)
        need_x, need_mask_token, _, need_pos = (tuple(ctx.needs_input_grad) + (False,) * 4)[:4]
        grad_out = grad_out.contiguous()  # autograd may hand over an expanded (stride-0) gradient
        grad_x = grad_mask_token = grad_pos = None
        if need_x or need_mask_token:
            grad_x, grad_mask_token = torch.ops.mae_fast.unshuffle_scatter_backward(
                grad_out, ids_restore, ctx.len_keep, ctx.len_decode)
        if need_pos and ctx.len_decode < 0:  # the broadcast add's backward, as the reference computes it
            grad_pos = grad_out.sum(0, keepdim=True)
        elif need_pos:  # decoder order: row 1+s is patch ids_decode[n, s]; dropped patches get 0
            grad_pos = _grad_pos_decoder_order(grad_out, ids_restore, ctx.len_keep, ctx.len_decode)
        grads = (grad_x if need_x else None, grad_mask_token if need_mask_token else None, None, grad_pos, None)
        return grads[:num_inputs]

    torch.library.register_autograd("mae_fast::unshuffle_scatter", _backward, setup_context=_setup_context)


def _grad_pos_decoder_order(grad_out, ids_restore, len_keep, len_decode):
    """grad_out (N, 1+K+M, D) in decoder order -> grad_pos_embed (1, 1+L, D): each patch's row
    summed over the samples that decoded it (pos_embed is frozen in the model; this is for
    completeness, e.g. a fork that trains it)."""
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    ids_decode = reference.decoder_ids(ids_restore, len_keep, len_decode)  # (N, K+M)
    grad_pos = grad_out.new_zeros((1 + L, D))
    grad_pos[0] = grad_out[:, 0].sum(0)
    grad_pos[1:].index_add_(0, ids_decode.reshape(-1), grad_out[:, 1:].reshape(-1, D))
    return grad_pos.unsqueeze(0)


def _unshuffle_cpp(x, mask_token, ids_restore, pos_embed, len_decode=-1):
    # The op wants one dtype and contiguous inputs; the reference promotes (e.g. bf16 activations
    # under autocast with fp32 mask_token / pos_embed -> fp32), so promote the same way. Both are
    # no-ops (no copy) in the model's usual call.
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    if pos_embed is not None:
        dtype = torch.promote_types(dtype, pos_embed.dtype)
        pos_embed = pos_embed.to(dtype).contiguous()
    # no index check here: the op itself checks on CPU, and on CUDA under MAE_FAST_DEBUG=1
    # (ops/_checks.py states the contract; the kernels are memory-safe on any index)
    args = (x.to(dtype).contiguous(), mask_token.to(dtype).contiguous(), ids_restore.contiguous(), pos_embed)
    if len_decode < 0:
        return torch.ops.mae_fast.unshuffle_scatter(*args)  # the official layout, as before
    return torch.ops.mae_fast.unshuffle_scatter(*args, len_decode)


def unshuffle(x, mask_token, ids_restore, pos_embed=None, *, backend="auto"):
    """x (N, 1+K, D); mask_token (1, 1, D); ids_restore (N, L), each row a permutation of 0..L-1;
    pos_embed (1, 1+L, D) or None -> (N, 1+L, D)."""
    choice = choose(OP, x.device, backend)
    if choice.impl == "c++":
        return _unshuffle_cpp(x, mask_token, ids_restore, pos_embed)
    return reference.unshuffle(x, mask_token, ids_restore, pos_embed)


def unshuffle_subset(x, mask_token, ids_restore, len_decode: int, pos_embed=None, *, backend="auto"):
    """Decoder input under decoder-side masking (``reference.unshuffle_subset``): x (N, 1+K, D);
    mask_token (1, 1, D); ids_restore (N, L), each row a permutation of 0..L-1; 0 <= len_decode
    <= L - K; pos_embed (1, 1+L, D) or None -> (N, 1+K+len_decode, D) in decoder order: cls,
    the K visible tokens, then mask tokens for the masked patches of noise rank K .. K+M-1
    (``reference.decoder_ids``). The same op as ``unshuffle`` with a ``len_decode`` index path:
    the dropped patches are skipped, never materialised."""
    K, L = x.shape[1] - 1, ids_restore.shape[1]
    if isinstance(len_decode, bool) or not isinstance(len_decode, int) or not 0 <= len_decode <= L - K:
        raise ValueError(f"len_decode must be an int in [0, L - K = {L - K}], got {len_decode!r}")
    choice = choose(OP, x.device, backend)
    if choice.impl == "c++":
        return _unshuffle_cpp(x, mask_token, ids_restore, pos_embed, len_decode)
    return reference.unshuffle_subset(x, mask_token, ids_restore, len_decode, pos_embed)
