"""Triton kernels of the masked reconstruction loss (official ``forward_loss``), target built
from the image pixels in registers: no patchified/normalised float target tensor is written.

  forward:  ``_masked_loss_fwd_kernel``  one program per patch (n, l): mask[n, l] * mean_j
            (pred - target)^2 -> a (N*L,) fp32 buffer; ``_masked_loss_reduce_kernel`` (one
            program, fixed order: deterministic, no float atomics) -> loss = sum / sum(mask).
  backward: ``_masked_loss_bwd_kernel``  one program per patch: grad_pred (0 where mask == 0),
            and, when asked, grad_imgs through the target (norm_pix_loss included).

Patches where mask == 0 (kept by the encoder) read no pixel and no prediction. Element
``(i, j, c)`` of patch ``l`` (pred's ``(p, q, c)`` order, as ``reference.patchify``) is pixel
``imgs[n, c, row * p + i, col * p + j]`` with ``row, col = divmod(l, grid_w)``.
"""
import triton
import triton.language as tl
import torch

from .patch_gather import _num_warps, _patch_blocks


@triton.jit
def _patch_target(
    imgs_ptr, pred_ptr, n, l, grid_w, weight,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    NORM_PIX: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Loads one patch of imgs and pred as fp32 (c, i, j) tiles; returns the target, the
    prediction, 1/std (1 without norm_pix_loss), the in-patch mask and the pixel offsets.
    Nothing is read where ``weight`` (the patch's mask value) is 0."""
    row = l // grid_w
    col = l % grid_w
    c = tl.arange(0, BLOCK_C)[:, None, None]
    i = tl.arange(0, BLOCK_P)[None, :, None]
    j = tl.arange(0, BLOCK_P)[None, None, :]
    inside = (c < CHANS) & (i < PATCH) & (j < PATCH)
    # patches with mask weight 0 read nothing (the splat keeps the interpreter's bool types happy)
    load = inside & ((weight + tl.zeros([BLOCK_C, BLOCK_P, BLOCK_P], tl.float32)) != 0.0)
    img_offs = (n.to(tl.int64) * stride_in + c * stride_ic
                + (row * PATCH + i) * stride_ih + (col * PATCH + j) * stride_iw)
    pred_offs = (n.to(tl.int64) * stride_pn + l * stride_pl
                 + ((i * PATCH + j) * CHANS + c) * stride_pd)
    pixels = tl.load(imgs_ptr + img_offs, mask=load, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + pred_offs, mask=load, other=0.0).to(tl.float32)
    if NORM_PIX:
        count = CHANS * PATCH * PATCH
        mean = tl.sum(tl.sum(tl.sum(pixels, 2), 1), 0) / count
        centred = tl.where(inside, pixels - mean, 0.0)
        var = tl.sum(tl.sum(tl.sum(centred * centred, 2), 1), 0) / (count - 1)  # unbiased
        inv_std = tl.div_rn(1.0, tl.sqrt_rn(var + 1e-6))
        target = centred * inv_std
    else:
        inv_std = 1.0
        target = pixels
    return target, pred, inv_std, inside, img_offs, pred_offs


@triton.jit
def _masked_loss_fwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, patch_loss_ptr,
    num_patches, grid_w,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    NORM_PIX: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)  # patch (n, l); mask is contiguous (N, L)
    n = pid // num_patches
    l = pid % num_patches
    weight = tl.load(mask_ptr + pid).to(tl.float32)
    target, pred, inv_std, inside, img_offs, pred_offs = _patch_target(
        imgs_ptr, pred_ptr, n, l, grid_w, weight,
        stride_in, stride_ic, stride_ih, stride_iw, stride_pn, stride_pl, stride_pd,
        NORM_PIX, CHANS, PATCH, BLOCK_C, BLOCK_P)
    diff = tl.where(inside, pred - target, 0.0)
    sq = tl.sum(tl.sum(tl.sum(diff * diff, 2), 1), 0) / (CHANS * PATCH * PATCH)
    tl.store(patch_loss_ptr + pid, tl.where(weight != 0.0, sq * weight, 0.0))


@triton.jit
def _masked_loss_reduce_kernel(
    patch_loss_ptr, mask_ptr, loss_ptr, mask_sum_ptr, total,
    BLOCK: tl.constexpr,
):
    """One program: fixed-order sums, so the loss is bit-identical run to run."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_mask = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, total, BLOCK):
        inside = start + offs < total
        acc_loss += tl.load(patch_loss_ptr + start + offs, mask=inside, other=0.0)
        acc_mask += tl.load(mask_ptr + start + offs, mask=inside, other=0.0).to(tl.float32)
    loss_sum = tl.sum(acc_loss, 0)
    mask_sum = tl.sum(acc_mask, 0)
    tl.store(loss_ptr, tl.div_rn(loss_sum, mask_sum).to(loss_ptr.dtype.element_ty))
    tl.store(mask_sum_ptr, mask_sum)


@triton.jit
def _masked_loss_bwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, grad_loss_ptr, mask_sum_ptr, grad_pred_ptr, grad_imgs_ptr,
    num_patches, grid_w,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    stride_gin, stride_gic, stride_gih, stride_giw,
    NORM_PIX: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, GRAD_IMGS: tl.constexpr,
):
    """grad_pred = grad_loss * mask / sum(mask) * 2 (pred - target) / P; grad_pred is
    contiguous (N, L, P). With GRAD_IMGS, grad_target = -grad_pred goes back through the
    target: norm_pix_loss's t = (x - mean) * inv_std with unbiased var gives
    grad_x = inv_std * (g - mean(g) - t * sum(g * t) / (P - 1))."""
    pid = tl.program_id(0)
    n = pid // num_patches
    l = pid % num_patches
    count = CHANS * PATCH * PATCH
    weight = tl.load(mask_ptr + pid).to(tl.float32)
    scale = (tl.load(grad_loss_ptr).to(tl.float32) * weight / tl.load(mask_sum_ptr)
             * 2.0 / count)
    target, pred, inv_std, inside, img_offs, pred_offs = _patch_target(
        imgs_ptr, pred_ptr, n, l, grid_w, weight,
        stride_in, stride_ic, stride_ih, stride_iw, stride_pn, stride_pl, stride_pd,
        NORM_PIX, CHANS, PATCH, BLOCK_C, BLOCK_P)
    grad_pred = tl.where(inside, scale * (pred - target), 0.0)  # scale is 0 where weight is
    c = tl.arange(0, BLOCK_C)[:, None, None]
    i = tl.arange(0, BLOCK_P)[None, :, None]
    j = tl.arange(0, BLOCK_P)[None, None, :]
    out_offs = pid.to(tl.int64) * count + (i * PATCH + j) * CHANS + c
    tl.store(grad_pred_ptr + out_offs, grad_pred.to(grad_pred_ptr.dtype.element_ty), mask=inside)
    if GRAD_IMGS:
        grad_target = -grad_pred
        if NORM_PIX:
            g_mean = tl.sum(tl.sum(tl.sum(grad_target, 2), 1), 0) / count
            g_dot_t = tl.sum(tl.sum(tl.sum(grad_target * target, 2), 1), 0)
            grad_pixels = inv_std * (grad_target - g_mean - target * (g_dot_t / (count - 1)))
        else:
            grad_pixels = grad_target
        row = l // grid_w
        col = l % grid_w
        gi_offs = (n.to(tl.int64) * stride_gin + c * stride_gic
                   + (row * PATCH + i) * stride_gih + (col * PATCH + j) * stride_giw)
        tl.store(grad_imgs_ptr + gi_offs,
                 tl.where(inside, grad_pixels, 0.0).to(grad_imgs_ptr.dtype.element_ty),
                 mask=inside)


_REDUCE_BLOCK = 1024


def _launch_args(imgs, patch_size):
    N, C, H, W = imgs.shape
    block_c, block_p = _patch_blocks(C, patch_size)
    return dict(CHANS=C, PATCH=patch_size, BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=_num_warps(block_c * block_p * block_p))


def masked_loss_fwd(imgs, pred, mask, patch_size: int, norm_pix_loss: bool, loss_dtype):
    """imgs (N, C, H, W) any strides; pred (N, L, P) any strides; mask (N, L) ->
    (loss 0-dim in loss_dtype, mask_sum 0-dim fp32)."""
    N, C, H, W = imgs.shape
    L = pred.shape[1]
    mask = mask.contiguous()
    patch_loss = torch.empty(N * L, dtype=torch.float32, device=imgs.device)
    loss = torch.empty((), dtype=loss_dtype, device=imgs.device)
    mask_sum = torch.empty((), dtype=torch.float32, device=imgs.device)
    if N * L:
        _masked_loss_fwd_kernel[(N * L,)](
            imgs, pred, mask, patch_loss,
            L, W // patch_size,
            *imgs.stride(), *pred.stride(),
            NORM_PIX=norm_pix_loss, **_launch_args(imgs, patch_size))
    _masked_loss_reduce_kernel[(1,)](patch_loss, mask, loss, mask_sum, N * L,
                                     BLOCK=_REDUCE_BLOCK, num_warps=4)
    return loss, mask_sum


def masked_loss_bwd(grad_loss, imgs, pred, mask, mask_sum, patch_size: int,
                    norm_pix_loss: bool, grad_imgs_wanted: bool):
    """-> (grad_pred (N, L, P) contiguous in pred's dtype, grad_imgs like imgs or None)."""
    N, C, H, W = imgs.shape
    L = pred.shape[1]
    mask = mask.contiguous()
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    grad_imgs = torch.empty_like(imgs) if grad_imgs_wanted else None
    gi = grad_imgs if grad_imgs_wanted else grad_pred  # unused pointer when not wanted
    gi_strides = grad_imgs.stride() if grad_imgs_wanted else (0, 0, 0, 0)
    if N * L:
        _masked_loss_bwd_kernel[(N * L,)](
            imgs, pred, mask, grad_loss, mask_sum, grad_pred, gi,
            L, W // patch_size,
            *imgs.stride(), *pred.stride(), *gi_strides,
            NORM_PIX=norm_pix_loss, GRAD_IMGS=grad_imgs_wanted,
            **_launch_args(imgs, patch_size))
    return grad_pred, grad_imgs
