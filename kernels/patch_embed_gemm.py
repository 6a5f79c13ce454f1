"""Stretch: the patch-embed GEMM itself in Triton, image -> encoder tokens in one kernel.

``_patch_embed_gemm_kernel`` computes out (N, 1+K, D) as a GEMM over M = N*(1+K) token rows:
  prologue  the A tile of a row is gathered straight from ``imgs`` (the kept patch
            ``ids_keep[n, t-1]``, (c, p, q) order = the Conv2d weight's), any strides;
            cls rows (t = 0) load nothing;
  main loop ``acc += A @ W^T`` over the C*p*p reduction, in ``DOT_DTYPE`` (fp32 uses IEEE
            fp32 products, like torch's default matmul; bf16/fp16 use the tensor-core MMA,
            fp32 accumulation);
  epilogue  + bias + pos_embed[1 + ids_keep] (patch rows) or cls_token + pos_embed[0] (cls rows),
            in fp32, one rounding to out's dtype.
Index map: the same as ``patch_gather`` (patch l at grid row l // grid_w, column l % grid_w).

``_patch_embed_gemm_bwd_kernel`` is its backward for the parameters, one kernel: grad_weight =
grad_tokens^T @ patches with the same gather as its prologue (patches are re-read from imgs, not
saved), grad_bias and grad_cls as column sums of the same grad_out rows; each output tile is
reduced by one program over all rows in order (deterministic, no atomics).
"""
import triton
import triton.language as tl
import torch
from . import on_tensor_device
from .patch_gather import _normalize_pixels, _patch_index, _round_rtne, pos_cls_rows


@triton.jit
def _token_rows(rows, row_ok, num_keep, ids_keep_ptr, stride_kn, stride_kk, grid_w, num_patches,
                stride_in, stride_ih, stride_iw, PATCH: tl.constexpr):
    """Token rows n * (1+K) + t of the (N, 1+K, D) output -> sample n, slot t, whether it is a
    kept patch (t > 0), whether it is a kept patch with an in-range index (``gather``), its patch
    index (an out-of-range one clamped to 0, so every address below stays inside the tensors),
    and the image offset of that patch's top-left pixel (forward and backward GEMMs share this).
    What an out-of-range row then computes (docs/CUDA.md, index contract): the forward a zero
    patch plus patch 0's positional row, the backward patch 0's pixels. Masking more (a zero
    positional row, a zero backward contribution) kept one more mask live across the main loop:
    +8 registers on sm_90a (the bf16 forward 128 -> 136: 2 -> 1 block per SM), so it is not done."""
    n = rows // (num_keep + 1)
    t = rows % (num_keep + 1)
    is_patch = row_ok & (t > 0)
    patch_id, id_ok = _patch_index(
        tl.load(ids_keep_ptr + n.to(tl.int64) * stride_kn + (t - 1) * stride_kk,
                mask=is_patch, other=0), num_patches)
    gather = is_patch & id_ok
    a_base = (n.to(tl.int64) * stride_in + ((patch_id // grid_w) * PATCH) * stride_ih
              + ((patch_id % grid_w) * PATCH) * stride_iw)  # [BLOCK_M]
    return n, t, is_patch, gather, patch_id, a_base


@triton.jit
def _pixel_tile(imgs_ptr, offs, ok, c, c_ok, norm_ptr, CHANS: tl.constexpr,
                NORMALIZE: tl.constexpr, PIXEL_DTYPE: tl.constexpr):
    """A tile of image pixels at ``offs`` (channel ``c`` of each column, [BLOCK_K] / [BLOCK_E]),
    0 where not ``ok``. NORMALIZE: uint8 pixels -> ``(x / 255 - mean[c]) / std[c]`` in fp32,
    rounded to PIXEL_DTYPE: the values the float image would hold (norm (2, C) fp32)."""
    a = tl.load(imgs_ptr + offs, mask=ok, other=0.0)
    if NORMALIZE:
        mean = tl.load(norm_ptr + c, mask=c_ok, other=0.0)
        std = tl.load(norm_ptr + CHANS + c, mask=c_ok, other=1.0)
        a = _round_rtne(_normalize_pixels(a, mean[None, :], std[None, :], ok), PIXEL_DTYPE)
    return a


@triton.jit
def _patch_embed_gemm_kernel(
    imgs_ptr, ids_keep_ptr, w_ptr, bias_ptr, pos_ptr, cls_ptr, out_ptr, norm_ptr,
    num_rows, num_keep, grid_w, num_patches, dim,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_kn, stride_kk,
    stride_wd, stride_pos, stride_bias,
    CHANS: tl.constexpr, PATCH: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr = False, PIXEL_DTYPE: tl.constexpr = tl.float32,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token rows n * (1+K) + t
    row_ok = rows < num_rows
    n, t, is_patch, gather, patch_id, a_base = _token_rows(
        rows, row_ok, num_keep, ids_keep_ptr, stride_kn, stride_kk, grid_w, num_patches,
        stride_in, stride_ih, stride_iw, PATCH)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CHANS * PATCH * PATCH, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)  # reduction index, (c, i, j) order
        e_ok = e < CHANS * PATCH * PATCH
        c = e // (PATCH * PATCH)
        i = (e // PATCH) % PATCH
        j = e % PATCH
        a_offs = c * stride_ic + i * stride_ih + j * stride_iw
        a = _pixel_tile(imgs_ptr, a_base[:, None] + a_offs[None, :], gather[:, None] & e_ok[None, :],
                        c, e_ok, norm_ptr, CHANS, NORMALIZE, PIXEL_DTYPE)
        b = tl.load(w_ptr + cols[None, :] * stride_wd + e[:, None],
                    mask=e_ok[:, None] & col_ok[None, :], other=0.0)  # W^T tile [BLOCK_K, BLOCK_N]
        if EMULATE_DOT:  # the interpreter's tl.dot cannot take bf16 (numpy sees uint16)
            acc = tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)

    pos_row = tl.where(t == 0, 0, 1 + patch_id)
    out_ok = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + pos_row[:, None] * stride_pos + cols[None, :], mask=out_ok, other=0.0)
    cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    extra = tl.where((t == 0)[:, None], cls[None, :], bias[None, :])
    val = acc + extra + pos.to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :],
             val.to(out_ptr.dtype.element_ty), mask=out_ok)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the forward, per compute dtype; BLOCK_N
# shrinks to D for narrow embeddings. Chosen by ptxas spills (tools/triton_aot.py, triton 3.6 and
# 3.8, sm_80/90/100, patch 16 and 14), not tuned on a GPU.
FORWARD_TILES = {
    # the bf16/fp16 MMA: 64x128x32 on 8 warps, the largest tile with 0 spills
    torch.bfloat16: (64, 128, 32, 8, 3),
    torch.float16: (64, 128, 32, 8, 3),
    # fp32 IEEE products (an FMA dot, no tensor cores: operand fragments live in registers):
    # 64x128x32/8 spilled at patch 14 on sm_80 (255 registers, 32-48 B) and on sm_90a under
    # triton 3.6; 32x64x32/4 has 0 spills everywhere (docs/TRITON.md lists what was tried)
    torch.float32: (32, 64, 32, 4, 3),
}


# (BLOCK_D, BLOCK_E, BLOCK_M, num_warps, num_stages) of the backward, per compute dtype: output
# tiles of grad_weight, BLOCK_M token rows a step. bf16/fp16: 64x64, 32 rows, 8 warps, 2 stages
# (tried and spilling: 4 warps with 1-3 stages, 64x64x16/4, 32x64x32/4, 64x32x32/4). fp32: the
# same tile 16 rows a step: 32 rows spilled 44 B at patch 14 on sm_100a (triton 3.8).
BACKWARD_TILES = {
    torch.bfloat16: (64, 64, 32, 8, 2),
    torch.float16: (64, 64, 32, 8, 2),
    torch.float32: (64, 64, 16, 8, 2),
}


def forward_tiles(compute_dtype: torch.dtype, dim: int):
    block_m, block_n, block_k, num_warps, num_stages = FORWARD_TILES[compute_dtype]
    return block_m, max(16, min(block_n, triton.next_power_of_2(dim))), block_k, num_warps, num_stages


@on_tensor_device
def patch_embed_gemm(imgs, weight, bias, pos_embed, cls_token, ids_keep,
                     compute_dtype: torch.dtype, out_dtype: torch.dtype,
                     pixel_norm=None, pixel_dtype=None) -> torch.Tensor:
    """imgs (N, C, H, W); weight (D, C, p, p); bias (D,) or None; pos_embed (1, 1+L, D);
    cls_token (1, 1, D); ids_keep (N, K) -> tokens (N, 1+K, D) in out_dtype. uint8 imgs:
    pixel_norm (2, C) fp32 (mean, std rows) and pixel_dtype, normalised in the prologue."""
    N, C, H, W = imgs.shape
    D, p = weight.shape[0], weight.shape[-1]
    K = ids_keep.shape[1]
    w2d = weight.reshape(D, -1)
    if w2d.stride(1) != 1:
        w2d = w2d.contiguous()
    pos, cls = pos_cls_rows(pos_embed, cls_token)
    out = imgs.new_empty((N, 1 + K, D), dtype=out_dtype)
    num_rows = N * (1 + K)
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = forward_tiles(compute_dtype, D)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(D, block_n))
    _patch_embed_gemm_kernel[grid](
        imgs, ids_keep, w2d, bias if bias is not None else cls, pos, cls, out,
        pixel_norm.contiguous() if pixel_norm is not None else cls,  # unused unless NORMALIZE
        num_rows, K, W // p, (H // p) * (W // p), D,
        *imgs.stride(), *ids_keep.stride(),
        w2d.stride(0), pos.stride(0), bias.stride(0) if bias is not None else 1,
        CHANS=C, PATCH=p, HAS_BIAS=bias is not None,
        DOT_DTYPE=_TL_DTYPE[compute_dtype], IEEE=compute_dtype == torch.float32,
        # Triton 3.8's interpreter multiplies bf16 tiles as raw uint16: under it (CPU tensors)
        # round the tiles to the compute dtype and multiply exactly in fp32 instead
        EMULATE_DOT=imgs.device.type == "cpu" and compute_dtype != torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages, **_normalize_args(pixel_dtype),
    )
    return out


def _normalize_args(pixel_dtype):
    return dict(NORMALIZE=pixel_dtype is not None, PIXEL_DTYPE=_TL_DTYPE[pixel_dtype or torch.float32])


@triton.jit
def _patch_embed_gemm_bwd_kernel(
    grad_out_ptr, imgs_ptr, ids_keep_ptr, grad_w_ptr, grad_bias_ptr, grad_cls_ptr, norm_ptr,
    num_rows, num_keep, grid_w, num_patches, dim,
    stride_gn, stride_gt, stride_gd,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_kn, stride_kk,
    CHANS: tl.constexpr, PATCH: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    NORMALIZE: tl.constexpr = False, PIXEL_DTYPE: tl.constexpr = tl.float32,
):
    """The forward's gradients in one kernel, grid (cdiv(D, BLOCK_D), cdiv(C*p*p, BLOCK_E)).
    Program (d, e) owns the grad_weight tile [BLOCK_D, BLOCK_E] and walks every token row of
    grad_out (N, 1+K, D) in order, BLOCK_M rows at a time (one program per output tile, fixed
    order: deterministic, no atomics):
      prologue  the patch tile A [BLOCK_M, BLOCK_E] of each row gathered straight from imgs,
                as the forward does (cls rows load nothing, so they add nothing);
      main loop grad_w += G^T @ A, G^T [BLOCK_D, BLOCK_M] read in place from grad_out, in
                DOT_DTYPE (the forward's compute dtype) with fp32 accumulation;
      column-block 0 programs also sum G over the patch rows (grad_bias, G rounded to the
                compute dtype as the GEMM sees it) and over the cls rows (grad_cls, as given).
    """
    pid_d = tl.program_id(0)
    pid_e = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # reduction index of the forward, (c, i, j)
    e_ok = e < CHANS * PATCH * PATCH
    a_offs = (e // (PATCH * PATCH)) * stride_ic + ((e // PATCH) % PATCH) * stride_ih \
        + (e % PATCH) * stride_iw
    sums = pid_e == 0

    acc = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cls_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for m0 in range(0, num_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # token rows n * (1+K) + t
        row_ok = rows < num_rows
        n, t, is_patch, gather, _, a_base = _token_rows(
            rows, row_ok, num_keep, ids_keep_ptr, stride_kn, stride_kk, grid_w, num_patches,
            stride_in, stride_ih, stride_iw, PATCH)
        a = _pixel_tile(imgs_ptr, a_base[:, None] + a_offs[None, :], is_patch[:, None] & e_ok[None, :],
                        e // (PATCH * PATCH), e_ok, norm_ptr, CHANS, NORMALIZE,
                        PIXEL_DTYPE)  # [BLOCK_M, BLOCK_E]
        g = tl.load(grad_out_ptr + (n.to(tl.int64) * stride_gn + t * stride_gt)[:, None]
                    + d[None, :] * stride_gd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        g_t = tl.trans(g)  # [BLOCK_D, BLOCK_M]
        g_dot = g_t.to(DOT_DTYPE)
        if EMULATE_DOT:  # the interpreter's tl.dot cannot take bf16 (numpy sees uint16)
            acc = tl.dot(g_dot.to(tl.float32), a.to(DOT_DTYPE).to(tl.float32), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(g_dot, a.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(g_dot, a.to(DOT_DTYPE), acc)
        if sums:
            bias_acc += tl.sum(tl.where(is_patch[None, :], g_dot.to(tl.float32), 0.0), axis=1)
            cls_acc += tl.sum(tl.where((row_ok & (t == 0))[None, :], g_t.to(tl.float32), 0.0),
                              axis=1)

    w_offs = d[:, None] * (CHANS * PATCH * PATCH) + e[None, :]
    tl.store(grad_w_ptr + w_offs, acc.to(grad_w_ptr.dtype.element_ty),
             mask=d_ok[:, None] & e_ok[None, :])
    if sums:
        tl.store(grad_bias_ptr + d, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=d_ok)
        tl.store(grad_cls_ptr + d, cls_acc.to(grad_cls_ptr.dtype.element_ty), mask=d_ok)


@on_tensor_device
def patch_embed_gemm_backward(grad_out, imgs, ids_keep, weight_shape, compute_dtype: torch.dtype,
                              weight_dtype: torch.dtype, bias_dtype: torch.dtype,
                              cls_dtype: torch.dtype, pixel_norm=None, pixel_dtype=None):
    """grad_out (N, 1+K, D) any strides; imgs (N, C, H, W) any strides; ids_keep (N, K) ->
    grad_weight (D, C, p, p) in weight_dtype, grad_bias (D,) in bias_dtype, grad_cls (1, 1, D)
    in cls_dtype, all from one kernel."""
    N, C, H, W = imgs.shape
    D, p = weight_shape[0], weight_shape[-1]
    K = ids_keep.shape[1]
    grad_weight = grad_out.new_empty(tuple(weight_shape), dtype=weight_dtype)
    grad_bias = grad_out.new_empty((D,), dtype=bias_dtype)
    grad_cls = grad_out.new_empty((1, 1, D), dtype=cls_dtype)
    if D == 0:
        return grad_weight, grad_bias, grad_cls
    block_d, block_e, block_m, num_warps, num_stages = BACKWARD_TILES[compute_dtype]
    grid = (triton.cdiv(D, block_d), triton.cdiv(C * p * p, block_e))
    _patch_embed_gemm_bwd_kernel[grid](
        grad_out, imgs, ids_keep, grad_weight, grad_bias, grad_cls,
        pixel_norm.contiguous() if pixel_norm is not None else grad_cls,  # unused unless NORMALIZE
        N * (1 + K), K, W // p, (H // p) * (W // p), D,
        *grad_out.stride(), *imgs.stride(), *ids_keep.stride(),
        CHANS=C, PATCH=p,
        DOT_DTYPE=_TL_DTYPE[compute_dtype], IEEE=compute_dtype == torch.float32,
        EMULATE_DOT=imgs.device.type == "cpu" and compute_dtype != torch.float32,
        BLOCK_D=block_d, BLOCK_E=block_e, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages,
        **_normalize_args(pixel_dtype),
    )
    return grad_weight, grad_bias, grad_cls
