"""Triton kernels of the encoder input: patchify + gather of the kept patches straight from the
image, and the positional/cls epilogue that follows the patch-embed GEMM.

Layers (as in Liger-Kernel): ``_<op>_kernel`` (Triton) -> launcher (``gather_patches`` ...,
plain functions on tensors). The torch ops, fake impls and autograd live in
``mae_fast.ops.patch_embed``; this module only knows pointers and strides.

Index map shared by every kernel here (one place, used both ways):
  patch ``l`` of image ``n`` sits at grid row ``l // grid_w``, column ``l % grid_w``;
  element ``(c, i, j)`` of that patch (the Conv2d weight's ``(c, p, q)`` order) is pixel
  ``imgs[n, c, row * p + i, col * p + j]``.

``_add_pos_cls_bwd_kernel`` is the epilogue's backward: the kept rows of grad_out copied out
contiguous (the linear's backward needs them so) and the cls gradient summed over the batch in a
fixed order.
"""
import triton
import triton.language as tl
import torch
from . import _interpreter_compat, on_tensor_device

# every kernel module imports this one, so this runs before any kernel does
_interpreter_compat.apply()


@triton.jit
def _patch_index(raw, num_patches):
    """Kept-patch indices as loaded (int32 or int64) -> (index as int32, whether it lies in
    [0, num_patches)). Out-of-range entries (which only the MAE_FAST_DEBUG check rejects on
    CUDA) become index 0 with ok = False, and every caller masks its memory accesses with ok:
    no index value can make a kernel touch memory outside its tensors. The range test runs
    before the narrowing to int32, so a wrapped int64 value cannot pass it."""
    ok = (raw >= 0) & (raw < num_patches)
    return tl.where(ok, raw, 0).to(tl.int32), ok


@triton.jit
def _normalize_pixels(raw, mean, std, ok):
    """uint8 pixels -> fp32 ``(raw / 255 - mean) / std`` (mean, std: fp32, broadcast to raw's
    shape), lanes not ``ok`` -> 0. Both divisions IEEE-rounded (``div_rn``: a plain ``/`` may
    lower to an approximate division on GPU), the same fp32 ops in the same order as
    ToTensor + Normalize on CPU (``mae_fast.reference.normalize_pixels``), so the values are
    bit-identical to a normalised float image's."""
    val = tl.div_rn(tl.div_rn(raw.to(tl.float32), 255.0) - mean, std)
    return tl.where(ok, val, 0.0)


@triton.jit
def _round_rtne(x, DTYPE: tl.constexpr):
    """finite fp32 x -> DTYPE, rounded to nearest even, as torch's ``.to(dtype)``. bf16 is
    rounded with integer ops (add 0x7FFF + the kept lowest bit, drop 16 bits): the same result
    as a GPU's ``cvt.rn.bf16.f32``, and the interpreter's fp32 -> bf16 cast, which truncates
    (triton 3.8), is not used. fp16: the plain cast (round to nearest even on both)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE != tl.float32:
        x = x.to(DTYPE)
    return x


@triton.jit
def _patch_copy_kernel(
    imgs_ptr, ids_keep_ptr, patches_ptr, norm_ptr,
    num_keep, grid_w, num_patches,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_kn, stride_kk,
    CHANS: tl.constexpr, PATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    TO_PATCHES: tl.constexpr, NORMALIZE: tl.constexpr = False,
):
    """One program per kept patch ``(n, k)``. TO_PATCHES: imgs -> patches (N, K, C*p*p)
    (forward gather); else patches -> imgs (backward scatter; kept patches are distinct, so
    every pixel is written by at most one program: plain stores, no atomics). An index outside
    [0, num_patches) is no patch: the gather writes zeros, the scatter writes nothing.
    NORMALIZE (gather only): imgs are uint8, norm (2, C) fp32 holds the mean and std rows, and
    each pixel is stored as ``(x / 255 - mean[c]) / std[c]`` rounded once to patches' dtype."""
    pid = tl.program_id(0)
    n = pid // num_keep
    k = pid % num_keep
    patch_id, id_ok = _patch_index(
        tl.load(ids_keep_ptr + n.to(tl.int64) * stride_kn + k * stride_kk), num_patches)
    row = patch_id // grid_w
    col = patch_id % grid_w

    c = tl.arange(0, BLOCK_C)[:, None, None]
    i = tl.arange(0, BLOCK_P)[None, :, None]
    j = tl.arange(0, BLOCK_P)[None, None, :]
    inside = (c < CHANS) & (i < PATCH) & (j < PATCH)

    img_offs = (n.to(tl.int64) * stride_in + c * stride_ic
                + (row * PATCH + i) * stride_ih + (col * PATCH + j) * stride_iw)
    patch_offs = pid.to(tl.int64) * (CHANS * PATCH * PATCH) + (c * PATCH + i) * PATCH + j
    if TO_PATCHES:
        vals = tl.load(imgs_ptr + img_offs, mask=inside & id_ok, other=0.0)
        if NORMALIZE:
            in_chans = c < CHANS  # [BLOCK_C, 1, 1]: one mean / std per channel
            vals = _round_rtne(
                _normalize_pixels(vals, tl.load(norm_ptr + c, mask=in_chans, other=0.0),
                                  tl.load(norm_ptr + CHANS + c, mask=in_chans, other=1.0),
                                  inside & id_ok), patches_ptr.dtype.element_ty)
        tl.store(patches_ptr + patch_offs, vals.to(patches_ptr.dtype.element_ty), mask=inside)
    else:
        vals = tl.load(patches_ptr + patch_offs, mask=inside)
        tl.store(imgs_ptr + img_offs, vals, mask=inside & id_ok)


@triton.jit
def _add_pos_cls_kernel(
    x_ptr, pos_ptr, cls_ptr, ids_keep_ptr, out_ptr,
    num_keep, dim, num_patches,
    stride_xn, stride_xk,
    stride_pos,
    stride_kn, stride_kk,
    BLOCK_D: tl.constexpr,
):
    """out (N, 1+K, D): row 0 = cls + pos[0]; row 1+k = x[n, k] + pos[1 + ids_keep[n, k]].
    Grid (N * (1+K), cdiv(D, BLOCK_D)); adds in fp32, one rounding to out's dtype. An index
    outside [0, num_patches) adds a zero positional row."""
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_dim = d < dim
    n = row // (num_keep + 1)
    t = row % (num_keep + 1)
    if t == 0:
        val = (tl.load(cls_ptr + d, mask=in_dim).to(tl.float32)
               + tl.load(pos_ptr + d, mask=in_dim).to(tl.float32))
    else:
        patch_id, id_ok = _patch_index(
            tl.load(ids_keep_ptr + n.to(tl.int64) * stride_kn + (t - 1) * stride_kk), num_patches)
        val = (tl.load(x_ptr + n.to(tl.int64) * stride_xn + (t - 1) * stride_xk + d,
                       mask=in_dim).to(tl.float32)
               + tl.load(pos_ptr + (1 + patch_id) * stride_pos + d, mask=in_dim & id_ok,
                         other=0.0).to(tl.float32))
    tl.store(out_ptr + row.to(tl.int64) * dim + d, val.to(out_ptr.dtype.element_ty), mask=in_dim)


def _patch_blocks(chans: int, patch: int):
    return triton.next_power_of_2(chans), triton.next_power_of_2(patch)


def _num_warps(elems: int) -> int:
    return 1 if elems <= 128 else 2 if elems <= 256 else 4 if elems <= 2048 else 8


def _patch_copy(imgs, ids_keep, patches, patch_size: int, to_patches: bool, pixel_norm=None):
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    if N * K == 0:
        return
    block_c, block_p = _patch_blocks(C, patch_size)
    normalize = pixel_norm is not None
    _patch_copy_kernel[(N * K,)](
        imgs, ids_keep, patches, pixel_norm if normalize else patches,  # unused unless NORMALIZE
        K, W // patch_size, (H // patch_size) * (W // patch_size),
        *imgs.stride(), *ids_keep.stride(),
        CHANS=C, PATCH=patch_size, BLOCK_C=block_c, BLOCK_P=block_p,
        TO_PATCHES=to_patches, NORMALIZE=normalize,
        num_warps=_num_warps(block_c * block_p * block_p),
    )


@on_tensor_device
def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs (N, C, H, W) any strides; ids_keep (N, K) int -> patches (N, K, C*p*p), (c, p, q)."""
    N, C = imgs.shape[:2]
    patches = imgs.new_empty((N, ids_keep.shape[1], C * patch_size * patch_size))
    _patch_copy(imgs, ids_keep, patches, patch_size, to_patches=True)
    return patches


@on_tensor_device
def gather_patches_normalized(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                              pixel_norm: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """uint8 imgs (N, C, H, W) any strides; ids_keep (N, K) int; pixel_norm (2, C) fp32 (mean,
    std rows) -> normalised patches (N, K, C*p*p) in out_dtype, (c, p, q) order."""
    N, C = imgs.shape[:2]
    patches = imgs.new_empty((N, ids_keep.shape[1], C * patch_size * patch_size), dtype=out_dtype)
    _patch_copy(imgs, ids_keep, patches, patch_size, to_patches=True,
                pixel_norm=pixel_norm.contiguous())
    return patches


@on_tensor_device
def scatter_patches(grad_patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                    grad_imgs: torch.Tensor) -> torch.Tensor:
    """The gather's backward: writes grad_patches (N, K, C*p*p) into the kept patches of
    grad_imgs (N, C, H, W), which the caller zero-fills (the pixels of removed patches)."""
    _patch_copy(grad_imgs, ids_keep, grad_patches.contiguous(), patch_size, to_patches=False)
    return grad_imgs


def pos_cls_rows(pos_embed: torch.Tensor, cls_token: torch.Tensor):
    """pos_embed (1, 1+L, D), cls_token (1, 1, D) -> the (1+L, D) table with unit column stride
    and the (D,) cls row, as the pos/cls epilogues read them."""
    pos = pos_embed[0]
    if pos.stride(-1) != 1:
        pos = pos.contiguous()
    return pos, cls_token.reshape(-1).contiguous()


@on_tensor_device
def add_pos_cls(x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor,
                ids_keep: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x (N, K, D) embedded kept patches; pos_embed (1, 1+L, D); cls_token (1, 1, D);
    ids_keep (N, K) -> tokens (N, 1+K, D)."""
    N, K, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    pos, cls = pos_cls_rows(pos_embed, cls_token)
    out = x.new_empty((N, 1 + K, D), dtype=out_dtype)
    if out.numel() == 0:
        return out
    block_d = min(triton.next_power_of_2(D), 1024)
    _add_pos_cls_kernel[(N * (1 + K), triton.cdiv(D, block_d))](
        x, pos, cls, ids_keep, out,
        K, D, pos.shape[0] - 1,
        x.stride(0), x.stride(1),
        pos.stride(0),
        *ids_keep.stride(),
        BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )
    return out


@triton.jit
def _add_pos_cls_bwd_kernel(
    grad_out_ptr, grad_x_ptr, grad_cls_ptr,
    batch, num_keep, dim, num_cls_programs,
    stride_gn, stride_gt, stride_gd,
    BLOCK_D: tl.constexpr, CLS_BLOCK_N: tl.constexpr, CLS_BLOCK_D: tl.constexpr,
):
    """add_pos_cls' backward, grid (num_cls_programs + N*K, cdiv(D, BLOCK_D)), grad_out
    (N, 1+K, D) any strides:
      program c < num_cls_programs (and column block 0): grad_cls[d] = sum over n of
                 grad_out[n, 0, d] for its CLS_BLOCK_D columns, in fp32, CLS_BLOCK_N rows a step
                 in order (one program per column block, fixed order: deterministic, no
                 atomics); first in the grid, so scheduled first;
      program num_cls_programs + r: grad_x[r] = grad_out[r // K, 1 + r % K] (the kept rows,
                 written contiguous in x's dtype: what the linear's backward would otherwise copy).
    """
    pid = tl.program_id(0)
    if pid < num_cls_programs:
        if tl.program_id(1) == 0:
            d = pid * CLS_BLOCK_D + tl.arange(0, CLS_BLOCK_D)
            in_dim = d < dim
            acc = tl.zeros([CLS_BLOCK_D], dtype=tl.float32)
            for n0 in range(0, batch, CLS_BLOCK_N):
                n = n0 + tl.arange(0, CLS_BLOCK_N)
                tile = tl.load(grad_out_ptr + n.to(tl.int64)[:, None] * stride_gn
                               + d[None, :] * stride_gd,
                               mask=(n < batch)[:, None] & in_dim[None, :], other=0.0)
                acc += tl.sum(tile.to(tl.float32), axis=0)
            tl.store(grad_cls_ptr + d, acc.to(grad_cls_ptr.dtype.element_ty), mask=in_dim)
    else:
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_dim = d < dim
        r = pid - num_cls_programs
        n = r // num_keep
        t = 1 + r % num_keep
        val = tl.load(grad_out_ptr + n.to(tl.int64) * stride_gn + t * stride_gt + d * stride_gd,
                      mask=in_dim)
        tl.store(grad_x_ptr + r.to(tl.int64) * dim + d, val.to(grad_x_ptr.dtype.element_ty),
                 mask=in_dim)


@on_tensor_device
def add_pos_cls_backward(grad_out: torch.Tensor, x_dtype: torch.dtype, cls_dtype: torch.dtype):
    """grad_out (N, 1+K, D) any strides -> grad_x (N, K, D) contiguous in x_dtype,
    grad_cls (1, 1, D) in cls_dtype (the batch sum of row 0, fp32 accumulation, n in order)."""
    N, T, D = grad_out.shape
    K = T - 1
    grad_x = grad_out.new_empty((N, K, D), dtype=x_dtype)
    grad_cls = grad_out.new_empty((1, 1, D), dtype=cls_dtype)
    if D == 0:
        return grad_x, grad_cls
    block_d = min(triton.next_power_of_2(D), 1024)
    # the cls sum: 32 rows x 128 columns a step (16 fp32 registers a thread at 4 warps)
    cls_block_d = min(triton.next_power_of_2(D), 128)
    num_cls = triton.cdiv(D, cls_block_d)
    _add_pos_cls_bwd_kernel[(num_cls + N * K, triton.cdiv(D, block_d))](
        grad_out, grad_x, grad_cls,
        N, K, D, num_cls,
        *grad_out.stride(),
        BLOCK_D=block_d, CLS_BLOCK_N=32, CLS_BLOCK_D=cls_block_d,
        num_warps=max(_num_warps(block_d), 4),
    )
    return grad_x, grad_cls
