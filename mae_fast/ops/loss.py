"""Masked reconstruction loss over removed patches, target built from the image.

Fast path (``impl == "triton"``): the torch op ``mae_fast::masked_loss`` runs two Triton
kernels (per-patch loss straight from the image pixels, then a one-program fixed-order
reduction: deterministic, no float atomics) and returns ``(loss, mask_sum)``; its registered
backward ``mae_fast::masked_loss_backward`` recomputes the target from the pixels and writes
``grad_pred`` (zero where mask == 0) and, when ``imgs`` requires grad, ``grad_imgs`` through
the target (norm_pix_loss included). No patchified float target is ever materialised.

Explicit fallback to the reference (documented in docs/TRITON.md): ``mask.requires_grad`` (the
loss's gradient w.r.t. the mask weights is not written in Triton), and, with
``backend="auto"``, dtypes other than fp32/fp16/bf16 (``backend="fast"`` raises instead).
Difference from the reference, by design: patches with mask == 0 are never read, so a NaN/Inf
in a kept patch's prediction does not reach the loss (the reference's ``0 * nan`` would).
"""
from typing import Optional, Tuple

import torch

from .. import reference
from ..backends import choose, register_fast, require_triton, triton_probe
from ._checks import check_ids
from .patch_embed import FAST_DTYPES, check_pixel_norm, check_same_device, fast_dtypes_ok, float_pixels

OP = "masked_loss"
register_fast(OP, "triton", triton_probe)


def _loss_dtype(imgs, pred, mask, pixel_dtype=None) -> torch.dtype:
    """The reference's result dtype: ((pred - target)**2).mean(-1) * mask, summed (a uint8
    image's target has the normalised image's dtype, pixel_dtype)."""
    return torch.promote_types(torch.promote_types(pred.dtype, pixel_dtype or imgs.dtype), mask.dtype)


@torch.library.custom_op("mae_fast::masked_loss", mutates_args=())
def masked_loss_op(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   norm_pix_loss: bool, pixel_norm: Optional[torch.Tensor] = None,
                   pixel_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """imgs (N, C, H, W); pred (N, L, C*p*p); mask (N, L) -> (loss (), mask_sum () fp32).
    uint8 imgs: pixel_norm (2, C) fp32 (mean, std rows) and pixel_dtype; the kernels build the
    target from ``(x / 255 - mean[c]) / std[c]`` rounded to pixel_dtype, in registers."""
    require_triton("masked_loss", imgs.device)
    from ..kernels import masked_loss as kernels
    return kernels.masked_loss_fwd(imgs, pred, mask, patch_size, norm_pix_loss,
                                   _loss_dtype(imgs, pred, mask, pixel_dtype), pixel_norm, pixel_dtype)


@masked_loss_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix_loss, pixel_norm=None, pixel_dtype=None):
    return (pred.new_empty((), dtype=_loss_dtype(imgs, pred, mask, pixel_dtype)),
            pred.new_empty((), dtype=torch.float32))


@torch.library.custom_op("mae_fast::masked_loss_backward", mutates_args=())
def masked_loss_backward(grad_loss: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor,
                         mask: torch.Tensor, mask_sum: torch.Tensor, patch_size: int,
                         norm_pix_loss: bool, grad_imgs_wanted: bool,
                         pixel_norm: Optional[torch.Tensor] = None,
                         pixel_dtype: Optional[torch.dtype] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_pred like pred, grad_imgs like imgs, or an empty tensor if not wanted)."""
    require_triton("masked_loss", imgs.device)
    from ..kernels import masked_loss as kernels
    grad_pred, grad_imgs = kernels.masked_loss_bwd(grad_loss, imgs, pred, mask, mask_sum,
                                                   patch_size, norm_pix_loss, grad_imgs_wanted,
                                                   pixel_norm, pixel_dtype)
    return grad_pred, (grad_imgs if grad_imgs_wanted else imgs.new_empty(0))


@masked_loss_backward.register_fake
def _(grad_loss, imgs, pred, mask, mask_sum, patch_size, norm_pix_loss, grad_imgs_wanted,
      pixel_norm=None, pixel_dtype=None):
    grad_imgs = torch.empty_like(imgs) if grad_imgs_wanted else imgs.new_empty(0)
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device), grad_imgs


def _setup(ctx, inputs, output):
    imgs, pred, mask, patch_size, norm_pix_loss, pixel_norm, pixel_dtype = inputs
    ctx.save_for_backward(imgs, pred, mask, output[1], pixel_norm)
    ctx.patch_size, ctx.norm_pix_loss, ctx.pixel_dtype = patch_size, norm_pix_loss, pixel_dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros() launched for mask_sum's (absent) gradient


def _backward(ctx, grad_loss, _grad_mask_sum):
    if grad_loss is None:
        return None, None, None, None, None, None, None
    imgs, pred, mask, mask_sum, pixel_norm = ctx.saved_tensors
    grad_imgs_wanted = ctx.needs_input_grad[0]
    grad_pred, grad_imgs = masked_loss_backward(grad_loss, imgs, pred, mask, mask_sum,
                                                ctx.patch_size, ctx.norm_pix_loss,
                                                grad_imgs_wanted, pixel_norm, ctx.pixel_dtype)
    return (grad_imgs if grad_imgs_wanted else None,
            grad_pred if ctx.needs_input_grad[1] else None, None, None, None, None, None)


masked_loss_op.register_autograd(_backward, setup_context=_setup)


def _image_patches(imgs, patch_size: int):
    """(N, L, P) of imgs (N, C, H, W) cut into patch_size patches; ValueError if it does not cut."""
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    p = patch_size
    if p < 1 or H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a whole number of {p}x{p} patches")
    return N, (H // p) * (W // p), C * p * p


def _check_inputs(imgs, pred, mask, patch_size: int) -> None:
    check_same_device(imgs=imgs, pred=pred, mask=mask)
    N, L, P = _image_patches(imgs, patch_size)
    if tuple(pred.shape) != (N, L, P):
        raise ValueError(f"pred must be ({N}, {L}, {P}), got {tuple(pred.shape)}")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must be ({N}, {L}), got {tuple(mask.shape)}")
    if not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be a float tensor (1 = removed), got {mask.dtype}")


def masked_loss(imgs, pred, mask, patch_size: int, norm_pix_loss: bool, *, backend="auto",
                pixel_norm=None, pixel_dtype=None):
    """imgs (N, C, H, W); pred (N, L, p*p*C); mask (N, L), 1 = removed -> scalar.

    uint8 imgs: ``pixel_norm`` (2, C) fp32 (mean, std rows) and ``pixel_dtype`` say which float
    image they stand for (``reference.normalize_pixels``); the loss equals that image's. The
    fast path normalises the removed patches' pixels in registers (no float image)."""
    check_pixel_norm(imgs, pixel_norm, pixel_dtype)
    choice = choose(OP, imgs.device, backend)
    if choice.impl == "reference" or mask.requires_grad:
        # mask.requires_grad: explicit fallback, the Triton backward has no grad_mask
        return reference.masked_loss(float_pixels(imgs, pixel_norm, pixel_dtype), pred, mask,
                                     patch_size, norm_pix_loss)
    pixels_dtype = pixel_dtype or imgs.dtype  # a uint8 image's: the float image it stands for
    if pixels_dtype not in FAST_DTYPES or not fast_dtypes_ok(pred, mask):
        if backend == "fast":
            raise TypeError(f"backend='fast': {OP} supports imgs, pred and mask in {FAST_DTYPES}, "
                            f"got {pixels_dtype}, {pred.dtype}, {mask.dtype}")
        return reference.masked_loss(float_pixels(imgs, pixel_norm, pixel_dtype), pred, mask,
                                     patch_size, norm_pix_loss)
    _check_inputs(imgs, pred, mask, patch_size)
    loss, _mask_sum = masked_loss_op(imgs, pred, mask, patch_size, norm_pix_loss, pixel_norm,
                                     pixel_dtype)
    return loss


# ------------------------------------------------------------------------------------------------
# Decoder-side masking (not in the official code): the loss over decoded rows only. pred_rows
# (N, R, P) may be a strided view (the model passes decoder_pred(x)[:, 1 + K:, :]: no copy) and
# row_ids (N, R) names each row's patch; the same Triton kernels with their ROW_IDS path.
ROWS_OP = "masked_loss"  # same chooser as the official loss


@torch.library.custom_op("mae_fast::masked_loss_rows", mutates_args=())
def masked_loss_rows_op(imgs: torch.Tensor, pred_rows: torch.Tensor, row_ids: torch.Tensor,
                        patch_size: int, norm_pix_loss: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """imgs (N, C, H, W); pred_rows (N, R, C*p*p); row_ids (N, R) int64 -> (loss (), count () fp32)."""
    require_triton("masked_loss", imgs.device)
    from ..kernels import masked_loss as kernels
    return kernels.masked_loss_fwd(imgs, pred_rows, None, patch_size, norm_pix_loss,
                                   torch.promote_types(pred_rows.dtype, imgs.dtype), row_ids=row_ids)


@masked_loss_rows_op.register_fake
def _(imgs, pred_rows, row_ids, patch_size, norm_pix_loss):
    return (pred_rows.new_empty((), dtype=torch.promote_types(pred_rows.dtype, imgs.dtype)),
            pred_rows.new_empty((), dtype=torch.float32))


@torch.library.custom_op("mae_fast::masked_loss_rows_backward", mutates_args=())
def masked_loss_rows_backward(grad_loss: torch.Tensor, imgs: torch.Tensor, pred_rows: torch.Tensor,
                              row_ids: torch.Tensor, count: torch.Tensor, patch_size: int,
                              norm_pix_loss: bool, grad_imgs_wanted: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_pred_rows (N, R, P) contiguous, grad_imgs like imgs (0 outside the rows'
    patches), or an empty tensor if not wanted)."""
    require_triton("masked_loss", imgs.device)
    from ..kernels import masked_loss as kernels
    grad_pred, grad_imgs = kernels.masked_loss_bwd(grad_loss, imgs, pred_rows, None, count, patch_size,
                                                   norm_pix_loss, grad_imgs_wanted, row_ids=row_ids)
    return grad_pred, (grad_imgs if grad_imgs_wanted else imgs.new_empty(0))


@masked_loss_rows_backward.register_fake
def _(grad_loss, imgs, pred_rows, row_ids, count, patch_size, norm_pix_loss, grad_imgs_wanted):
    grad_imgs = torch.empty_like(imgs) if grad_imgs_wanted else imgs.new_empty(0)
    return torch.empty(pred_rows.shape, dtype=pred_rows.dtype, device=pred_rows.device), grad_imgs


def _setup_rows(ctx, inputs, output):
    imgs, pred_rows, row_ids, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(imgs, pred_rows, row_ids, output[1])
    ctx.patch_size, ctx.norm_pix_loss = patch_size, norm_pix_loss
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_rows(ctx, grad_loss, _grad_count):
    if grad_loss is None:
        return None, None, None, None, None
    imgs, pred_rows, row_ids, count = ctx.saved_tensors
    grad_imgs_wanted = ctx.needs_input_grad[0]
    grad_pred, grad_imgs = masked_loss_rows_backward(grad_loss, imgs, pred_rows, row_ids, count,
                                                     ctx.patch_size, ctx.norm_pix_loss, grad_imgs_wanted)
    return (grad_imgs if grad_imgs_wanted else None,
            grad_pred if ctx.needs_input_grad[1] else None, None, None, None)


masked_loss_rows_op.register_autograd(_backward_rows, setup_context=_setup_rows)


def _check_rows_inputs(imgs, pred_rows, row_ids, patch_size: int) -> None:
    check_same_device(imgs=imgs, pred_rows=pred_rows, row_ids=row_ids)
    N, L, P = _image_patches(imgs, patch_size)
    if row_ids.dim() != 2 or row_ids.shape[0] != N:
        raise ValueError(f"row_ids must be ({N}, R), got {tuple(row_ids.shape)}")
    if row_ids.dtype != torch.int64:
        raise TypeError(f"row_ids must be int64, got {row_ids.dtype}")
    R = row_ids.shape[1]
    if R < 1:
        raise ValueError("row_ids must name at least one row per sample (the loss is a mean over rows)")
    if tuple(pred_rows.shape) != (N, R, P):
        raise ValueError(f"pred_rows must be ({N}, {R}, {P}), got {tuple(pred_rows.shape)}")
    check_ids(row_ids, L, "row_ids", distinct=True)


def masked_loss_rows(imgs, pred_rows, row_ids, patch_size: int, norm_pix_loss: bool, *, backend="auto",
                     pixel_norm=None, pixel_dtype=None):
    """Decoder-side masking's loss (``reference.masked_loss_subset``): imgs (N, C, H, W);
    pred_rows (N, R, p*p*C), any strides; row_ids (N, R) int64, distinct patch ids in [0, L)
    per row -> scalar = mean over the N*R rows of the per-patch loss.

    uint8 imgs (``pixel_norm``, ``pixel_dtype`` as in ``masked_loss``): normalised to the float
    image first, then as above (not yet fused into this path: one float image is made)."""
    check_pixel_norm(imgs, pixel_norm, pixel_dtype)
    imgs = float_pixels(imgs, pixel_norm, pixel_dtype)
    _check_rows_inputs(imgs, pred_rows, row_ids, patch_size)
    choice = choose(ROWS_OP, imgs.device, backend)
    if choice.impl == "reference" or not fast_dtypes_ok(imgs, pred_rows):
        if choice.impl != "reference" and backend == "fast":
            raise TypeError(f"backend='fast': masked_loss_rows supports imgs and pred_rows in {FAST_DTYPES}, "
                            f"got {imgs.dtype}, {pred_rows.dtype}")
        return reference.masked_loss_subset(imgs, pred_rows, row_ids, patch_size, norm_pix_loss)
    loss, _count = masked_loss_rows_op(imgs, pred_rows, row_ids, patch_size, norm_pix_loss)
    return loss
