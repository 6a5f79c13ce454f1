"""Triton kernels of the fused residual add + LayerNorm of a pre-norm block
(``h = x + branch; y = LayerNorm(h)``), forward and backward.

  forward:  ``_add_ln_fwd_kernel``  a tile of rows (tokens) per program: loads x (and the branch), forms
            h = x + branch rounded to h's dtype (as a plain ``x + branch`` rounds it), normalises
            that rounded h in fp32 and writes h, y (in y's dtype) and the fp32 mean / rstd.
            Without a branch (the first block's norm1) h is x and is not written.
  backward: ``_add_ln_bwd_kernel``  each program walks a contiguous chunk of rows in tiles: per row
            dsum = dh + LN_bwd(dy) (the residual-gradient add folded in, one rounding), and in
            registers the fp32 partial sums of dweight (dy * xhat) and dbias (dy) over its rows,
            written once to a (programs, D) fp32 workspace; ``_ln_grad_reduce_kernel`` sums the
            workspace's rows in a fixed order -> dweight, dbias. Deterministic, no float
            atomics, no host sync.

Rows are contiguous (stride D): the launcher makes them so (the model's tensors already are).
"""
import triton
import triton.language as tl
import torch

from . import _interpreter_compat, on_tensor_device

_interpreter_compat.apply()  # runtime loop bounds under triton 3.6's interpreter

# the workspace reduction's tile: (partial rows, columns) per step
REDUCE_ROWS = 32
REDUCE_COLS = 128


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 -> ``dtype``, rounded to nearest even as ``torch`` and the GPU's ``cvt.rn`` do.
    Triton's interpreter truncates fp32 -> bf16, so for bf16 the rounding is made on the bits
    first (the cast is then exact): the same result compiled, and the tests see it too."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = tl.where(v == v, bits.to(tl.float32, bitcast=True), v)  # NaN stays NaN
    return v.to(dtype)


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr, branch_ptr, weight_ptr, bias_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr,
    n_rows, D, eps,
    HAS_BRANCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A [BLOCK_R rows, BLOCK_D] tile per program (several rows where D is small)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_in = rows < n_rows
    inside = row_in[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    h = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        branch = tl.load(branch_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        # the residual stream in its own dtype: the LayerNorm below sees the rounded sum
        h_out = _round_to(h + branch, h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h_out, mask=inside)
        h = h_out.to(tl.float32)
    mean = tl.sum(h, 1) / D
    centred = tl.where(inside, h - mean[:, None], 0.0)
    var = tl.sum(centred * centred, 1) / D  # biased, as LayerNorm
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    weight = tl.load(weight_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=row_in)
    tl.store(rstd_ptr + rows, rstd, mask=row_in)


@triton.jit
def _add_ln_bwd_kernel(
    dy_ptr, dh_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, dsum_ptr, dweight_part_ptr, dbias_part_ptr,
    n_rows, D, rows_per_program,
    HAS_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...) in [BLOCK_R, BLOCK_D] tiles (rows_per_program is a
    multiple of BLOCK_R): dsum = dh + rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)),
    xhat = (h - mean) * rstd; the program's dweight / dbias partial sums in fp32 registers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_in = cols < D
    weight = tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(0, row_end - row_start, BLOCK_R):
        rows = (row_start + start + tl.arange(0, BLOCK_R)).to(tl.int64)  # int64: R * D may pass 2**31
        row_in = rows < row_end
        inside = row_in[:, None] & col_in[None, :]
        offs = rows[:, None] * D + cols[None, :]
        h = tl.load(h_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_in, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)
        xhat = tl.where(inside, (h - mean[:, None]) * rstd[:, None], 0.0)
        wdy = weight[None, :] * dy
        c_xhat = tl.sum(wdy * xhat, 1) / D
        c_mean = tl.sum(wdy, 1) / D
        dsum = (wdy - (xhat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        if HAS_DH:
            dsum += tl.load(dh_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dsum_ptr + offs, _round_to(dsum, dsum_ptr.dtype.element_ty), mask=inside)
        dweight_acc += tl.sum(dy * xhat, 0)
        dbias_acc += tl.sum(dy, 0)
    part = pid.to(tl.int64) * D + cols
    tl.store(dweight_part_ptr + part, dweight_acc, mask=col_in)
    tl.store(dbias_part_ptr + part, dbias_acc, mask=col_in)


@triton.jit
def _ln_grad_reduce_kernel(
    dweight_part_ptr, dbias_part_ptr, dweight_ptr, dbias_ptr,
    num_parts, D,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column block per program; the workspace's rows summed in a fixed order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    parts = tl.arange(0, BLOCK_P)
    dweight_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, num_parts, BLOCK_P):
        rows = start + parts
        inside = (rows < num_parts)[:, None] & (cols < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dweight_acc += tl.load(dweight_part_ptr + offs, mask=inside, other=0.0)
        dbias_acc += tl.load(dbias_part_ptr + offs, mask=inside, other=0.0)
    tl.store(dweight_ptr + cols, _round_to(tl.sum(dweight_acc, 0), dweight_ptr.dtype.element_ty), mask=cols < D)
    tl.store(dbias_ptr + cols, _round_to(tl.sum(dbias_acc, 0), dbias_ptr.dtype.element_ty), mask=cols < D)


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8 if block_d <= 2048 else 16


@on_tensor_device
def add_layer_norm_fwd(x, branch, weight, bias, eps: float, y_dtype, block_r: int):
    """x (R, D) contiguous; branch (R, D) contiguous or None; weight, bias (D,); ``block_r``
    rows per program (ops/layernorm.py's rule) -> (h (R, D) in x + branch's dtype, or an empty
    tensor without a branch; y (R, D) in y_dtype; mean, rstd (R,) fp32)."""
    R, D = x.shape
    h_dtype = torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype
    h = torch.empty((R, D) if branch is not None else (0,), dtype=h_dtype, device=x.device)
    y = torch.empty((R, D), dtype=y_dtype, device=x.device)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        block_d = triton.next_power_of_2(D)
        _add_ln_fwd_kernel[(triton.cdiv(R, block_r),)](
            x, branch if branch is not None else x, weight, bias, h if branch is not None else y,
            y, mean, rstd, R, D, eps,
            HAS_BRANCH=branch is not None, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=_num_warps(block_d))
    return h, y, mean, rstd


@on_tensor_device
def add_layer_norm_bwd(dy, dh, h, weight, mean, rstd, num_programs: int, rows_per_program: int,
                       block_r: int, dsum_dtype):
    """dy (R, D); dh (R, D) or None; h (R, D) (the LayerNorm's input); weight (D,); mean, rstd
    (R,) fp32; ``num_programs`` chunks of ``rows_per_program`` rows, in tiles of ``block_r``
    rows (ops/layernorm.py's rule) -> (dsum (R, D) in dsum_dtype, dweight, dbias (D,) in
    weight's dtype)."""
    R, D = h.shape
    dsum = torch.empty((R, D), dtype=dsum_dtype, device=h.device)
    dweight = torch.empty(D, dtype=weight.dtype, device=h.device)
    dbias = torch.empty(D, dtype=weight.dtype, device=h.device)
    dweight_part = torch.empty((num_programs, D), dtype=torch.float32, device=h.device)
    dbias_part = torch.empty((num_programs, D), dtype=torch.float32, device=h.device)
    block_d = triton.next_power_of_2(D)
    if num_programs:
        _add_ln_bwd_kernel[(num_programs,)](
            dy, dh if dh is not None else dy, h, weight, mean, rstd, dsum, dweight_part, dbias_part,
            R, D, rows_per_program,
            HAS_DH=dh is not None, BLOCK_R=block_r, BLOCK_D=block_d,
            # twice the forward's warps: the backward holds two more row tiles (dy, dh) and the
            # dweight / dbias accumulators (triton 3.6 spilled 8 B at D 1024, bf16, sm_100a with 4)
            num_warps=_num_warps(2 * block_d))
    _ln_grad_reduce_kernel[(triton.cdiv(D, REDUCE_COLS),)](
        dweight_part, dbias_part, dweight, dbias, num_programs, D,
        BLOCK_P=REDUCE_ROWS, BLOCK_C=REDUCE_COLS, num_warps=4)
    return dsum, dweight, dbias
