"""Opt-in (``MAE_FAST_MLP=gemm``): the transformer MLP's GEMMs with their elementwise work in
the epilogue, so GELU, GELU' and the bias gradients are no separate passes over the
(rows, hidden) activations.

``_mlp_gemm_kernel``, C = A @ B over M rows (A (M, K), B (K, N), any strides), fp32 accumulation:
  forward   (GELU_GRAD=False) fc1: A = x, B = W1^T; epilogue pre = acc + bias (fp32), stores
            ``pre`` and ``act = GELU(pre)``, exact erf GELU (``nn.GELU()``'s default, not tanh)
            computed in fp32 from the unrounded pre, each rounded once to the output dtype;
  backward  (GELU_GRAD=True) fc2's grad-input GEMM: A = dy, B = W2; epilogue loads the saved
            ``pre`` and stores ``d(pre) = acc * GELU'(pre)`` (fp32, one rounding): d(act) is
            never written;
  residual  (RESIDUAL=True) a Linear whose output is added to the residual stream, the
            attention proj / fc2 of a pre-norm block (``x = x + branch``): A = the branch's
            input, B = W^T; epilogue branch = acc + bias rounded to the GEMM's dtype (what
            ``F.linear`` returns), then out = branch + residual in fp32, rounded once to out's
            dtype (what the plain ``x + branch`` does): the plain ops' two roundings, so out
            equals them up to the GEMM's own accumulation order. ``pre`` is not used.
``_linear_wgrad_kernel``: a Linear's weight gradient dW (N, K) = G^T @ X over M rows with the
bias gradient db (N,) = column sums of G in the same walk (the programs of column block 0 sum
the G tiles they already load); each output tile is reduced by one program over every row in
order: deterministic, no atomics, no split-K. G may come in up to 3 column parts, each its own
tensor (the qkv projection's dq, dk, dv where the attention's backward wrote them): a third
grid axis picks the part, whose programs write dW rows [p N, (p + 1) N) and the same db slice,
so the (3C, C) / (3C,) gradients of the qkv Linear are one launch with no concatenated copy.

Main loop: ``tl.dot`` in ``DOT_DTYPE`` (the operands' dtype): fp32 uses IEEE fp32 products
(``input_precision="ieee"``, like torch's default fp32 matmul, no TF32), bf16 / fp16 the
tensor-core MMA. Under the interpreter (CPU tensors) bf16 / fp16 tiles are multiplied exactly
in fp32 (``EMULATE_DOT``: the interpreter's tl.dot reads bf16 as raw uint16, docs/TRITON.md).
"""
import triton
import triton.language as tl
import torch
from . import on_tensor_device
from . import patch_gather  # noqa: F401  (applies the interpreter compatibility fix first)
from .add_layer_norm import _round_to  # round to nearest even, also under the interpreter

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# globals a @jit function reads must be constexpr (the interpreter does not enforce it)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE_DOT: tl.constexpr):
    """acc + a @ b with the operands in DOT_DTYPE, fp32 accumulation."""
    if EMULATE_DOT:  # the interpreter's tl.dot cannot take bf16 (numpy sees uint16)
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), acc,
                      input_precision="ieee")
    elif IEEE:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _mlp_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, pre_ptr, out_ptr, res_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_pm, stride_om, stride_rm,
    HAS_BIAS: tl.constexpr, GELU_GRAD: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per [BLOCK_M, BLOCK_N] tile of the (M, N) output; programs are ordered in
    groups of GROUP_M row blocks so that neighbouring programs share B tiles in L2. ``pre``,
    ``out`` and the residual are (M, N) with unit column stride."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    # the tile's first row as a 64-bit scalar offset, the rows inside it as 32-bit offsets:
    # per-element 64-bit offsets cost registers the epilogue needs (ptxas spilled with them)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = pid_m * BLOCK_M + offs_m < M
    col_ok = cols < N
    a_rows = a_ptr + row0 * stride_am + offs_m[:, None] * stride_am  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = _dot(a, b, acc, DOT_DTYPE, IEEE, EMULATE_DOT)

    out_ok = row_ok[:, None] & col_ok[None, :]
    pre_ptrs = pre_ptr + row0 * stride_pm + offs_m[:, None] * stride_pm + cols[None, :]
    if HAS_BIAS:  # (the forward epilogues; the GELU' launch has no bias)
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU_GRAD:
        # d(pre) = d(act) * GELU'(pre), GELU'(x) = Phi(x) + x * phi(x), in fp32
        pre = tl.load(pre_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * SQRT1_2))
        pdf = tl.exp(-0.5 * pre * pre) * INV_SQRT_2PI
        val = acc * (cdf + pre * pdf)
    elif RESIDUAL:
        # out = round(round(acc + bias) + residual): F.linear's rounding, then the plain add's
        branch = _round_to(acc, DOT_DTYPE).to(tl.float32)
        res = tl.load(res_ptr + row0 * stride_rm + offs_m[:, None] * stride_rm + cols[None, :],
                      mask=out_ok, other=0.0).to(tl.float32)
        val = _round_to(branch + res, out_ptr.dtype.element_ty)
    else:
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=out_ok)
        val = 0.5 * acc * (1.0 + tl.math.erf(acc * SQRT1_2))  # exact GELU of the fp32 pre
    tl.store(out_ptr + row0 * stride_om + offs_m[:, None] * stride_om + cols[None, :],
             val.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _linear_wgrad_kernel(
    g_ptr, g1_ptr, g2_ptr, x_ptr, gw_ptr, gb_ptr,
    M, N, K,
    stride_gm, stride_g1m, stride_g2m, stride_gn, stride_xm, stride_xk,
    PARTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """G = [G0 | G1 | G2] (M, PARTS * N): PARTS column parts of N columns each, each its own
    tensor (base pointer and row stride; one column stride). Grid (cdiv(N, BLOCK_N),
    cdiv(K, BLOCK_K), PARTS): program (n, k, p) owns the dW tile [BLOCK_N, BLOCK_K] of rows
    p * N + n and walks every row of G_p (M, N) and X (M, K) in order, BLOCK_M rows a step:
    dW += G_p^T @ X; the programs with k == 0 also sum G_p's columns (db). dW (PARTS * N, K) and
    db (PARTS * N,) are contiguous."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PARTS > 1:  # the part's G, picked once before the main loop (a select: a stride equal
        part = tl.program_id(2)  # to 1 is a constexpr, which an if / else could not merge)
        g_ptr = tl.where(part == 0, g_ptr, tl.where(part == 1, g1_ptr, g2_ptr))
        stride_gm = tl.where(part == 0, stride_gm, tl.where(part == 1, stride_g1m, stride_g2m))
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = n < N
    k_ok = k < K
    sums = pid_k == 0
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # the step's first row as a 64-bit scalar offset, the rows inside it as 32-bit offsets
    # (per-element 64-bit offsets cost registers: ptxas spilled with them, 3 parts, fp32, sm_100a)
    offs_m = tl.arange(0, BLOCK_M)
    g_tile = offs_m[:, None] * stride_gm + n[None, :] * stride_gn  # [BLOCK_M, BLOCK_N]
    x_tile = offs_m[:, None] * stride_xm + k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    for m0 in range(0, M, BLOCK_M):
        row0 = tl.full([], m0, tl.int64)
        row_ok = m0 + offs_m < M
        g = tl.load(g_ptr + row0 * stride_gm + g_tile,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        x = tl.load(x_ptr + row0 * stride_xm + x_tile,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = _dot(tl.trans(g), x, acc, DOT_DTYPE, IEEE, EMULATE_DOT)
        if sums:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    if PARTS > 1:  # the part's rows of dW and db (the offset made here, not held through the loop)
        n += tl.program_id(2) * N
    tl.store(gw_ptr + n.to(tl.int64)[:, None] * K + k[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])
    if sums:
        tl.store(gb_ptr + n, bias_acc.to(gb_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of _mlp_gemm_kernel per dtype;
# BLOCK_N / BLOCK_K shrink for narrow outputs / reductions. Chosen by ptxas spills
# (tools/triton_aot.py, sm_80/90/100, both epilogues), NOT tuned on a GPU.
GEMM_TILES = {
    torch.bfloat16: (128, 128, 32, 8, 8, 3),
    torch.float16: (128, 128, 32, 8, 8, 3),
    # fp32 IEEE products: an FMA dot, operand fragments in registers: a smaller tile
    torch.float32: (32, 64, 32, 8, 4, 3),
}

# (BLOCK_N, BLOCK_K, BLOCK_M, num_warps, num_stages) of _linear_wgrad_kernel per dtype: dW tiles
# of 64x64 (ViT-B fc1/fc2: 576 programs; the decoder's 512x2048: 256), BLOCK_M rows a step
WGRAD_TILES = {
    torch.bfloat16: (64, 64, 32, 4, 3),
    torch.float16: (64, 64, 32, 4, 3),
    torch.float32: (64, 64, 16, 4, 2),
}


def _narrow(block: int, size: int) -> int:
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def gemm_tiles(dtype: torch.dtype, N: int, K: int):
    block_m, block_n, block_k, group_m, num_warps, num_stages = GEMM_TILES[dtype]
    return block_m, _narrow(block_n, N), _narrow(block_k, K), group_m, num_warps, num_stages


def wgrad_tiles(dtype: torch.dtype, N: int, K: int):
    block_n, block_k, block_m, num_warps, num_stages = WGRAD_TILES[dtype]
    return _narrow(block_n, N), _narrow(block_k, K), block_m, num_warps, num_stages


def _dot_flags(t: torch.Tensor):
    dtype = t.dtype
    return dict(DOT_DTYPE=_TL_DTYPE[dtype], IEEE=dtype == torch.float32,
                # Triton 3.8's interpreter multiplies bf16 tiles as raw uint16: under it (CPU
                # tensors) round to the dtype and multiply exactly in fp32 instead
                EMULATE_DOT=t.device.type == "cpu" and dtype != torch.float32)


def _launch_gemm(a, b_t, stride_bk, stride_bn, bias, pre, out, gelu_grad: bool, residual=None):
    M, K = a.shape
    N = out.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = gemm_tiles(a.dtype, N, K)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    res = residual if residual is not None else out
    _mlp_gemm_kernel[grid](
        a, b_t, bias if bias is not None else out, pre, out, res,
        M, N, K,
        a.stride(0), a.stride(1), stride_bk, stride_bn, pre.stride(0), out.stride(0), res.stride(0),
        HAS_BIAS=bias is not None, GELU_GRAD=gelu_grad, RESIDUAL=residual is not None, **_dot_flags(a),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )


@on_tensor_device
def fc1_gelu(x: torch.Tensor, weight: torch.Tensor, bias):
    """x (M, K), weight (N, K), bias (N,) or None, one dtype -> pre = x W^T + b and
    act = GELU(pre), both (M, N) contiguous in that dtype, from one kernel."""
    M, K = x.shape
    N = weight.shape[0]
    pre = x.new_empty((M, N))
    act = x.new_empty((M, N))
    if pre.numel():
        _launch_gemm(x, weight, weight.stride(1), weight.stride(0), bias, pre, act, gelu_grad=False)
    return pre, act


@on_tensor_device
def fc2_gelu_grad(grad_y: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor):
    """grad_y (M, C), fc2's weight (C, N), pre (M, N) with unit column stride -> d(pre) =
    (grad_y @ W) * GELU'(pre), (M, N) contiguous in pre's dtype, from one kernel."""
    grad_pre = torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)
    if grad_pre.numel():
        _launch_gemm(grad_y, weight, weight.stride(0), weight.stride(1), None, pre, grad_pre,
                     gelu_grad=True)
    return grad_pre


@on_tensor_device
def linear_residual(a: torch.Tensor, weight: torch.Tensor, bias, residual: torch.Tensor):
    """a (M, K), weight (N, K), bias (N,) or None, one dtype; residual (M, N) with unit column
    stride -> out = residual + (a W^T + b) (M, N) contiguous in promote(a's dtype, residual's),
    the branch rounded to a's dtype before the add (as ``residual + F.linear(a, W, b)``)."""
    M, K = a.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=torch.promote_types(a.dtype, residual.dtype), device=a.device)
    if out.numel():
        _launch_gemm(a, weight, weight.stride(1), weight.stride(0), bias, out, out, gelu_grad=False,
                     residual=residual)
    return out


@on_tensor_device
def linear_weight_grad(grad_out: torch.Tensor, inp: torch.Tensor, *more_grad_outs: torch.Tensor):
    """grad_out (M, N), inp (M, K), one dtype -> dW = grad_out^T @ inp (N, K) and db = column
    sums of grad_out (N,), in that dtype, from one kernel (fp32 accumulation).

    ``more_grad_outs``: up to two more (M, N) column parts of the gradient, G = [grad_out | G1 |
    G2] (e.g. dq, dk, dv of a qkv projection, each where the attention's backward wrote it) ->
    dW (P * N, K), db (P * N,) from the same single launch, no concatenated copy of G."""
    parts = (grad_out,) + more_grad_outs
    if len(parts) > 3:
        raise ValueError(f"linear_weight_grad takes at most 3 column parts of the gradient, got {len(parts)}")
    M, N = grad_out.shape  # every part (M, N), one dtype: the op checks (mae_fast.ops.mlp)
    K = inp.shape[1]
    if len({g.stride(1) for g in parts}) > 1:  # one column stride in the kernel: unit it
        parts = tuple(g if g.stride(1) == 1 else g.contiguous() for g in parts)
    grad_w = grad_out.new_empty((len(parts) * N, K))
    grad_b = grad_out.new_empty((len(parts) * N,))
    if N == 0:
        return grad_w, grad_b
    block_n, block_k, block_m, num_warps, num_stages = wgrad_tiles(grad_out.dtype, N, K)
    grid = (triton.cdiv(N, block_n), max(1, triton.cdiv(K, block_k)), len(parts))
    g0, g1, g2 = (parts + (parts[0],) * 2)[:3]  # unused pointers: part 0's (never read)
    _linear_wgrad_kernel[grid](
        g0, g1, g2, inp, grad_w, grad_b,
        M, N, K,
        g0.stride(0), g1.stride(0), g2.stride(0), g0.stride(1), inp.stride(0), inp.stride(1),
        PARTS=len(parts), **_dot_flags(grad_out),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages,
    )
    return grad_w, grad_b
