"""Residual add + LayerNorm of the pre-norm blocks, fused: ``h, y = add_layer_norm(x, branch,
weight, bias, eps)`` is ``h = x + branch; y = F.layer_norm(h, (D,), weight, bias, eps)``.

Fast path (``impl == "triton"``, kernels/add_layer_norm.py): the torch op
``mae_fast::add_layer_norm`` reads x and the branch once and writes h, y and the fp32
mean / rstd in one launch; its registered backward ``mae_fast::add_layer_norm_backward`` takes
dy and dh (the residual stream's gradient from later) and writes dsum = dh + LN_bwd(dy), which
is the gradient of both x and the branch, plus dweight / dbias from per-program fp32 partial
sums and a one-launch fixed-order reduction (no host sync, no float atomics). Without a branch
(the first block's norm1) it is a plain LayerNorm.

Numerics: h is rounded to its dtype (x + branch's promoted dtype) before it is normalised, as
the plain ``x + branch`` then ``F.layer_norm`` does, so h is bitwise the plain h; the
LayerNorm runs in fp32 and y is rounded once. Backward rounds dsum once (the plain path rounds
the LayerNorm's input gradient, then the residual add's sum). Autocast: ``layer_norm`` is on
CUDA autocast's fp32 list, so under CUDA autocast y is fp32 whatever the input and parameter
dtypes (as ``F.layer_norm`` there); CPU autocast leaves ``layer_norm`` as given, and so does
this op on CPU tensors (the interpreter lane). The add is on no list (h keeps the promoted
dtype), as in the plain block.

Saved for backward: h (the LayerNorm's input, which autograd's ``native_layer_norm`` saves
too), weight, and the fp32 mean / rstd (R floats each, as aten's): the same tensors the plain
path saves, so peak activation memory does not grow (tests/test_add_layer_norm.py checks it
with ``saved_activation_bytes``).

The LayerNorm of the residual stream without the add (``norm_stream``, used when the add runs
in the proj / fc2 GEMM epilogues, MAE_FAST_MLP=gemm): ``y, s = norm_stream(s, norm)`` returns
LayerNorm(s) and s itself, passed through an autograd function (``_NormStream``) so that the
residual epilogue after it consumes that alias: the stream's two gradients (from the LayerNorm
and from the residual add) meet in that function's backward, which is
``add_layer_norm_backward(dy, dh=d(stream), h=s)``: dsum = dh + LN_bwd(dy) in one kernel, no
autograd add of the two. The alias is a view of s made by autograd (no copy). Forward:
``mae_fast::add_layer_norm`` without a branch (reads s, writes y and the fp32 mean / rstd);
saved for backward: s (the LayerNorm's input, as autograd's ``native_layer_norm`` saves),
weight, mean, rstd.

Explicit fallback to the reference: dtypes other than fp32 / bf16 / fp16, widths above
``MAX_WIDTH``, no affine weight or bias, a branch that broadcasts, a weight dtype the plain
``F.layer_norm`` would not mix with h's. ``backend="fast"`` raises on those instead, and
``backend="auto"`` warns once per reason where the kernel could otherwise have run (CUDA).
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attention as _attention
from ..backends import choose, register_fast, require_triton, triton_probe
from .patch_embed import FAST_DTYPES, check_same_device

OP = "add_layer_norm"
register_fast(OP, "triton", triton_probe)

MAX_WIDTH = 4096  # BLOCK_D = next_power_of_2(D) <= 4096: one row in registers, no spills (AOT)
MAX_BWD_PROGRAMS = 512  # backward: rows split into at most this many chunks (partial sums each)
TILE = 2048  # elements of a [rows, BLOCK_D] tile: several rows per program where D is small


def block_rows(D: int) -> int:
    """Rows per tile of the kernels: TILE // next_power_of_2(D), at least 1 (a power of 2)."""
    block_d = 1 << max(0, (D - 1).bit_length())
    return max(1, TILE // block_d)


def bwd_programs(num_rows: int, D: int) -> Tuple[int, int]:
    """(programs, rows per program) of the backward kernel: at most MAX_BWD_PROGRAMS chunks of a
    whole number of tiles each, every program with at least one row (each writes one row of
    partial sums)."""
    if num_rows == 0:
        return 0, block_rows(D)
    block_r = block_rows(D)
    tiles = -(-num_rows // block_r)
    rows_per_program = -(-tiles // min(tiles, MAX_BWD_PROGRAMS)) * block_r
    return -(-num_rows // rows_per_program), rows_per_program


# ---- the torch ops ---------------------------------------------------------------------------

@torch.library.custom_op("mae_fast::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: torch.Tensor, eps: float, y_dtype: torch.dtype
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, branch (R, D) contiguous (branch may be None); weight, bias (D,) -> (h (R, D), or an
    empty tensor without a branch; y (R, D) in y_dtype; mean, rstd (R,) fp32)."""
    require_triton("add_layer_norm", x.device)
    from ..kernels import add_layer_norm as kernels
    return kernels.add_layer_norm_fwd(x, branch, weight, bias, eps, y_dtype, block_rows(x.shape[1]))


@add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, y_dtype):
    R, D = x.shape
    h = (x.new_empty((R, D), dtype=torch.promote_types(x.dtype, branch.dtype)) if branch is not None
         else x.new_empty((0,)))
    return (h, x.new_empty((R, D), dtype=y_dtype), x.new_empty((R,), dtype=torch.float32),
            x.new_empty((R,), dtype=torch.float32))


@torch.library.custom_op("mae_fast::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor,
                            weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (R, D); dh (R, D) or None; h (R, D) the LayerNorm's input -> (dsum (R, D) in h's
    dtype = dh + LN_bwd(dy), dweight, dbias (D,) in weight's dtype)."""
    require_triton("add_layer_norm", h.device)
    from ..kernels import add_layer_norm as kernels
    R, D = h.shape
    programs, rows_per_program = bwd_programs(R, D)
    return kernels.add_layer_norm_bwd(dy, dh, h, weight, mean, rstd, programs, rows_per_program,
                                      block_rows(D), h.dtype)


@add_layer_norm_backward.register_fake
def _(dy, dh, h, weight, mean, rstd):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, branch, weight, _bias, _eps, _y_dtype = inputs
    h, _y, mean, rstd = output
    ctx.save_for_backward(h if branch is not None else x, weight, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.branch_dtype = branch.dtype if branch is not None else None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zeros() for an unused h or the stats


def _backward(ctx, dh, dy, _dmean, _drstd):
    normed, weight, mean, rstd = ctx.saved_tensors
    need_x, need_branch, need_weight, need_bias = ctx.needs_input_grad[:4]
    if ctx.branch_dtype is None:
        dh = None  # no h output: x's other uses reach x through autograd
    if dy is None:  # y unused: the add's gradient only
        dsum, dweight, dbias = dh, None, None
    else:
        dsum, dweight, dbias = add_layer_norm_backward(
            dy.contiguous(), dh.contiguous() if dh is not None else None, normed, weight, mean, rstd)
    dx = dsum.to(ctx.x_dtype) if need_x and dsum is not None else None
    dbranch = (dsum.to(ctx.branch_dtype) if need_branch and dsum is not None
               and ctx.branch_dtype is not None else None)
    return (dx, dbranch, dweight if need_weight else None, dbias if need_bias else None, None, None)


add_layer_norm_op.register_autograd(_backward, setup_context=_setup)


# ---- the public op -------------------------------------------------------------------------

def reference_add_layer_norm(x, branch, weight, bias, eps: float):
    """The plain block's ops: ``h = x + branch`` (h = x without a branch), ``F.layer_norm(h)``."""
    h = x if branch is None else x + branch
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def _autocast_layer_norm_fp32(device_type: str) -> bool:
    """Whether autocast runs ``layer_norm`` in fp32 on ``device_type`` tensors: CUDA autocast
    has it on its fp32 list (so does mae_fast.accounting's MetaAutocast, which models CUDA's);
    CPU autocast does not (it runs as given)."""
    return device_type != "cpu" and _attention._autocast_dtype(device_type) is not None


def _unsupported(x, branch, weight, bias, autocast_fp32: bool) -> str:
    """Why the kernel does not take these inputs ("" when it does)."""
    if weight is None or bias is None:
        return "LayerNorm without an affine weight and bias"
    tensors = (x, weight, bias) + ((branch,) if branch is not None else ())
    if not all(t.dtype in FAST_DTYPES for t in tensors):
        return f"dtypes {[str(t.dtype) for t in tensors]} (the kernel takes {FAST_DTYPES})"
    D = x.shape[-1]
    if D > MAX_WIDTH or D == 0:
        return f"width {D} (the kernel takes 1..{MAX_WIDTH})"
    if branch is not None and branch.shape != x.shape:
        return f"branch {tuple(branch.shape)} broadcasts against x {tuple(x.shape)}"
    if tuple(weight.shape) != (D,) or tuple(bias.shape) != (D,):
        return f"weight / bias of shape {tuple(weight.shape)} / {tuple(bias.shape)}, not ({D},)"
    h_dtype = torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype
    if weight.dtype != bias.dtype or (weight.dtype not in (h_dtype, torch.float32) and not autocast_fp32):
        return f"weight {weight.dtype} / bias {bias.dtype} with a {h_dtype} input"
    return ""


_warned = set()


def _kernel_y_dtype(x, branch, weight, bias, backend):
    """The dtype of y when the Triton kernel takes these inputs, else None (the reference
    runs): backend="fast" raises where it cannot run, "auto" warns once per reason on CUDA."""
    if choose(OP, x.device, backend).impl == "reference":
        return None
    check_same_device(x=x, branch=branch, weight=weight, bias=bias)
    autocast_fp32 = _autocast_layer_norm_fp32(x.device.type)
    why = _unsupported(x, branch, weight, bias, autocast_fp32)
    if why:
        if backend == "fast":
            raise TypeError(f"backend='fast': {OP} cannot run the Triton kernel on {why}")
        if why not in _warned and x.device.type == "cuda":
            _warned.add(why)
            warnings.warn(f"mae_fast: {OP} runs the reference (plain add + F.layer_norm) for {why}",
                          RuntimeWarning, stacklevel=3)
        return None
    h_dtype = torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype
    return torch.float32 if autocast_fp32 else h_dtype


def add_layer_norm(x, branch, weight, bias, eps: float, *, backend="auto"):
    """x (..., D); branch like x or None; weight, bias (D,) -> (h = x + branch (x itself when
    branch is None), y = LayerNorm(h)), as ``reference_add_layer_norm``."""
    y_dtype = _kernel_y_dtype(x, branch, weight, bias, backend)
    if y_dtype is None:
        return reference_add_layer_norm(x, branch, weight, bias, eps)
    D = x.shape[-1]
    rows = x.reshape(-1, D).contiguous()
    branch_rows = branch.reshape(-1, D).contiguous() if branch is not None else None
    h, y, _mean, _rstd = add_layer_norm_op(rows, branch_rows, weight, bias, float(eps), y_dtype)
    h = h.view(x.shape) if branch is not None else x
    return h, y.view(x.shape)


class _NormStream(torch.autograd.Function):
    """(rows (R, D), weight, bias, eps, y_dtype) -> (y (R, D), rows passed through)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, eps: float, y_dtype):
        _h, y, mean, rstd = add_layer_norm_op(rows, None, weight, bias, eps, y_dtype)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        return y, rows  # rows: autograd returns a view of the input (its own grad_fn), no copy

    @staticmethod
    def backward(ctx, dy, dstream):
        rows, weight, mean, rstd = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        if dy is None:  # y unused: the stream's gradient only
            return dstream, None, None, None, None
        dsum, dweight, dbias = add_layer_norm_backward(
            dy.contiguous(), dstream.to(rows.dtype).contiguous() if dstream is not None else None,
            rows, weight, mean, rstd)
        return (dsum if need_rows else None, dweight if need_weight else None,
                dbias if need_bias else None, None, None)


def _is_plain_layer_norm(norm: nn.Module) -> bool:
    """An ``nn.LayerNorm`` over the last dim without hooks (what the kernels compute)."""
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
            and not (norm._forward_hooks or norm._forward_pre_hooks))


def norm_stream(s, norm: nn.Module, *, fused: bool = True, backend="auto"):
    """The residual stream s (..., D) -> (norm(s), s'), where s' is s for the residual add
    after it (a GEMM epilogue): with ``fused``, a plain ``nn.LayerNorm`` over the last dim
    without hooks, the kernel's inputs and not under torch.compile, s' is ``_NormStream``'s
    alias of s (the two gradients of s summed in the LayerNorm backward's kernel); otherwise
    s' is s and ``norm`` runs as given (autograd sums the two gradients)."""
    plain_layer_norm = _is_plain_layer_norm(norm)
    if not (fused and plain_layer_norm and s.is_contiguous()) or torch.compiler.is_compiling():
        return norm(s), s
    y_dtype = _kernel_y_dtype(s, None, norm.weight, norm.bias, backend)
    if y_dtype is None:
        return norm(s), s
    D = s.shape[-1]
    y, rows = _NormStream.apply(s.view(-1, D), norm.weight, norm.bias, float(norm.eps), y_dtype)
    return y.view(s.shape), rows.view(s.shape)


def add_norm(x, branch, norm: nn.Module, *, fused: bool = True, backend="auto"):
    """``h = x + branch`` (x when branch is None) and ``norm(h)`` -> (h, norm(h)): through
    ``add_layer_norm`` when ``fused`` and ``norm`` is a plain ``nn.LayerNorm`` over the last dim
    without hooks; otherwise the plain ops, calling ``norm`` itself (a replaced or hooked norm
    runs as given)."""
    plain_layer_norm = _is_plain_layer_norm(norm)
    if fused and plain_layer_norm:
        return add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, backend=backend)
    h = x if branch is None else x + branch
    return h, norm(h)
