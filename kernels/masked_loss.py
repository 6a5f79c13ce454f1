"""Triton kernels of the masked reconstruction loss (official ``forward_loss``), target built
from the image pixels in registers: no patchified/normalised float target tensor is written.

  forward:  ``_masked_loss_fwd_kernel``  one program per patch (n, l): mask[n, l] * mean_j
            (pred - target)^2 -> a (N*L,) fp32 buffer; ``_masked_loss_reduce_kernel`` (one
            program, fixed order: deterministic, no float atomics) -> loss = sum / sum(mask).
  backward: ``_masked_loss_bwd_kernel``  one program per patch: grad_pred (0 where mask == 0),
            and, when asked, grad_imgs through the target (norm_pix_loss included).

Decoder-side masking (``ROW_IDS``, not in the official code): pred (N, R, P) holds only R
decoded rows per sample and ``row_ids`` (N, R) int64 names the patch of each row; one program
per row, every row weighs 1 (the loss is the mean over the N*R rows), no mask is read, and
rows whose id lies outside [0, L) read nothing. The official path (ROW_IDS=False) compiles
to the same code as before.

Patches where mask == 0 (kept by the encoder) read no pixel and no prediction. Element
``(i, j, c)`` of patch ``l`` (pred's ``(p, q, c)`` order, as ``reference.patchify``) is pixel
``imgs[n, c, row * p + i, col * p + j]`` with ``row, col = divmod(l, grid_w)``.
"""
import triton
import triton.language as tl
import torch

from .patch_gather import _normalize_pixels, _num_warps, _patch_blocks, _round_rtne
from . import on_tensor_device


@triton.jit
def _tile_offsets(
    n, l, grid_w,
    stride_in, stride_ic, stride_ih, stride_iw,
    PIXEL_MAJOR: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    TILE_0: tl.constexpr, TILE_1: tl.constexpr, TILE_2: tl.constexpr,
):
    """Patch (n, l) on a [TILE_0, TILE_1, TILE_2] register tile -> (inside, image offsets,
    index of each element in the patch vector in pred's (p, q, c) order).
      channel-major (NCHW and any other strides): tile (c, i, j); an image row is contiguous.
      pixel-major (the launcher checked stride_ic == 1 and stride_iw == C: channels_last):
      tile (1, i, j * C + c); a tile row is contiguous in the image *and* in pred."""
    row = l // grid_w
    col = l % grid_w
    a = tl.arange(0, TILE_0)[:, None, None]
    i = tl.arange(0, TILE_1)[None, :, None]
    b = tl.arange(0, TILE_2)[None, None, :]
    if PIXEL_MAJOR:
        inside = (a < 1) & (i < PATCH) & (b < PATCH * CHANS)
        img_offs = (n.to(tl.int64) * stride_in + (row * PATCH + i) * stride_ih
                    + (col * PATCH) * stride_iw + b)
        patch_offs = i * (PATCH * CHANS) + b
    else:
        inside = (a < CHANS) & (i < PATCH) & (b < PATCH)
        img_offs = (n.to(tl.int64) * stride_in + a * stride_ic
                    + (row * PATCH + i) * stride_ih + (col * PATCH + b) * stride_iw)
        patch_offs = (i * PATCH + b) * CHANS + a
    return inside, img_offs, patch_offs


@triton.jit
def _sum3(x):
    return tl.sum(tl.sum(tl.sum(x, 2), 1), 0)


@triton.jit
def _patch_target(
    imgs_ptr, pred_ptr, n, l, grid_w, weight,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    NORM_PIX: tl.constexpr, PIXEL_MAJOR: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    TILE_0: tl.constexpr, TILE_1: tl.constexpr, TILE_2: tl.constexpr,
    norm_ptr, NORMALIZE: tl.constexpr, PIXEL_DTYPE: tl.constexpr,
):
    """Loads one patch of imgs and pred as fp32 tiles; returns the target, the prediction,
    1/std (1 without norm_pix_loss), the in-patch mask and the element's index in the patch.
    Nothing is read where ``weight`` (the patch's mask value) is 0. NORMALIZE: imgs are uint8
    and a pixel is ``(x / 255 - mean[c]) / std[c]`` (norm (2, C) fp32), rounded to PIXEL_DTYPE
    (the float image's dtype it stands for) as that image's load would see it."""
    inside, img_offs, patch_offs = _tile_offsets(
        n, l, grid_w, stride_in, stride_ic, stride_ih, stride_iw,
        PIXEL_MAJOR, CHANS, PATCH, TILE_0, TILE_1, TILE_2)
    # patches with mask weight 0 read nothing (the splat keeps the interpreter's bool types happy)
    load = inside & ((weight + tl.zeros([TILE_0, TILE_1, TILE_2], tl.float32)) != 0.0)
    pred_offs = n.to(tl.int64) * stride_pn + l * stride_pl + patch_offs * stride_pd
    pixels = tl.load(imgs_ptr + img_offs, mask=load, other=0.0)
    if NORMALIZE:
        chan = patch_offs % CHANS  # pred's (p, q, c) order: the channel is the fastest index
        pixels = _round_rtne(
            _normalize_pixels(pixels, tl.load(norm_ptr + chan, mask=load, other=0.0),
                              tl.load(norm_ptr + CHANS + chan, mask=load, other=1.0), load),
            PIXEL_DTYPE)
    pixels = pixels.to(tl.float32)
    pred = tl.load(pred_ptr + pred_offs, mask=load, other=0.0).to(tl.float32)
    if NORM_PIX:
        count = CHANS * PATCH * PATCH
        mean = _sum3(pixels) / count
        centred = tl.where(inside, pixels - mean, 0.0)
        var = _sum3(centred * centred) / (count - 1)  # unbiased, as Tensor.var
        inv_std = tl.div_rn(1.0, tl.sqrt_rn(var + 1e-6))
        target = centred * inv_std
    else:
        inv_std = 1.0
        target = pixels
    return target, pred, inv_std, inside, patch_offs


@triton.jit
def _row_patch(pid, num_patches, mask_ptr, row_ids_ptr, img_patches, pred_ptr, stride_pl,
               ROW_IDS: tl.constexpr):
    """Program pid -> (n, patch l, weight, pred_ptr shifted so that ``_patch_target``'s row-l
    addressing reads pred row r). Official: pid = (n, l), weight = mask[n, l]. ROW_IDS: pid =
    (n, r) of pred (N, R, P), l = row_ids[n, r], weight 1 (0, reading nothing, if l is not in
    [0, img_patches))."""
    n = pid // num_patches
    if ROW_IDS:
        r = pid % num_patches
        patch = tl.load(row_ids_ptr + pid)
        valid = (patch >= 0) & (patch < img_patches)
        l = tl.where(valid, patch, 0).to(tl.int32)
        weight = tl.where(valid, 1.0, 0.0)
        pred_rows_ptr = pred_ptr + (r - l).to(tl.int64) * stride_pl
    else:
        l = pid % num_patches
        weight = tl.load(mask_ptr + pid).to(tl.float32)
        pred_rows_ptr = pred_ptr
    return n, l, weight, pred_rows_ptr


@triton.jit
def _masked_loss_fwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, row_ids_ptr, patch_loss_ptr, norm_ptr,
    num_patches, img_patches, grid_w,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    NORM_PIX: tl.constexpr, PIXEL_MAJOR: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    TILE_0: tl.constexpr, TILE_1: tl.constexpr, TILE_2: tl.constexpr,
    ROW_IDS: tl.constexpr = False, NORMALIZE: tl.constexpr = False, PIXEL_DTYPE: tl.constexpr = tl.float32,
):
    pid = tl.program_id(0)  # patch (n, l); mask is contiguous (N, L) (ROW_IDS: pred row (n, r))
    n, l, weight, pred_rows_ptr = _row_patch(pid, num_patches, mask_ptr, row_ids_ptr, img_patches,
                                             pred_ptr, stride_pl, ROW_IDS)
    target, pred, inv_std, inside, patch_offs = _patch_target(
        imgs_ptr, pred_rows_ptr, n, l, grid_w, weight,
        stride_in, stride_ic, stride_ih, stride_iw, stride_pn, stride_pl, stride_pd,
        NORM_PIX, PIXEL_MAJOR, CHANS, PATCH, TILE_0, TILE_1, TILE_2,
        norm_ptr, NORMALIZE, PIXEL_DTYPE)
    diff = tl.where(inside, pred - target, 0.0)
    sq = _sum3(diff * diff) / (CHANS * PATCH * PATCH)
    tl.store(patch_loss_ptr + pid, tl.where(weight != 0.0, sq * weight, 0.0))


@triton.jit
def _masked_loss_reduce_kernel(
    patch_loss_ptr, mask_ptr, loss_ptr, mask_sum_ptr, total,
    BLOCK: tl.constexpr, ROW_IDS: tl.constexpr,
):
    """One program: fixed-order sums, so the loss is bit-identical run to run. ROW_IDS: every
    row weighs 1, mask_sum = total (mask_ptr unused)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_mask = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, total, BLOCK):
        inside = start + offs < total
        acc_loss += tl.load(patch_loss_ptr + start + offs, mask=inside, other=0.0)
        if ROW_IDS:
            acc_mask += tl.where(inside, 1.0, 0.0)
        else:
            acc_mask += tl.load(mask_ptr + start + offs, mask=inside, other=0.0).to(tl.float32)
    loss_sum = tl.sum(acc_loss, 0)
    mask_sum = tl.sum(acc_mask, 0)
    tl.store(loss_ptr, tl.div_rn(loss_sum, mask_sum).to(loss_ptr.dtype.element_ty))
    tl.store(mask_sum_ptr, mask_sum)


@triton.jit
def _masked_loss_bwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, row_ids_ptr, grad_loss_ptr, mask_sum_ptr, grad_pred_ptr, grad_imgs_ptr,
    norm_ptr,
    num_patches, img_patches, grid_w,
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_pn, stride_pl, stride_pd,
    stride_gin, stride_gic, stride_gih, stride_giw,
    NORM_PIX: tl.constexpr, PIXEL_MAJOR: tl.constexpr, CHANS: tl.constexpr, PATCH: tl.constexpr,
    TILE_0: tl.constexpr, TILE_1: tl.constexpr, TILE_2: tl.constexpr, GRAD_IMGS: tl.constexpr,
    ROW_IDS: tl.constexpr = False, NORMALIZE: tl.constexpr = False, PIXEL_DTYPE: tl.constexpr = tl.float32,
):
    """grad_pred = grad_loss * mask / sum(mask) * 2 (pred - target) / P; grad_pred is
    contiguous (N, L, P). With GRAD_IMGS, grad_target = -grad_pred goes back through the
    target: norm_pix_loss's t = (x - mean) * inv_std with unbiased var gives
    grad_x = inv_std * (g - mean(g) - t * sum(g * t) / (P - 1)).
    ROW_IDS: grad_pred is contiguous (N, R, P); grad_imgs is written only at the rows' patches
    (the launcher zero-fills it)."""
    pid = tl.program_id(0)
    n, l, weight, pred_rows_ptr = _row_patch(pid, num_patches, mask_ptr, row_ids_ptr, img_patches,
                                             pred_ptr, stride_pl, ROW_IDS)
    count = CHANS * PATCH * PATCH
    scale = (tl.load(grad_loss_ptr).to(tl.float32) * weight / tl.load(mask_sum_ptr)
             * 2.0 / count)
    target, pred, inv_std, inside, patch_offs = _patch_target(
        imgs_ptr, pred_rows_ptr, n, l, grid_w, weight,
        stride_in, stride_ic, stride_ih, stride_iw, stride_pn, stride_pl, stride_pd,
        NORM_PIX, PIXEL_MAJOR, CHANS, PATCH, TILE_0, TILE_1, TILE_2,
        norm_ptr, NORMALIZE, PIXEL_DTYPE)
    grad_pred = tl.where(inside, scale * (pred - target), 0.0)  # scale is 0 where weight is
    tl.store(grad_pred_ptr + pid.to(tl.int64) * count + patch_offs,
             grad_pred.to(grad_pred_ptr.dtype.element_ty), mask=inside)
    if GRAD_IMGS:
        grad_target = -grad_pred
        if NORM_PIX:
            g_mean = _sum3(grad_target) / count
            g_dot_t = _sum3(grad_target * target)
            grad_pixels = inv_std * (grad_target - g_mean - target * (g_dot_t / (count - 1)))
        else:
            grad_pixels = grad_target
        # grad_imgs has the tile's layout (the launcher allocates it so)
        _, gi_offs, _ = _tile_offsets(
            n, l, grid_w, stride_gin, stride_gic, stride_gih, stride_giw,
            PIXEL_MAJOR, CHANS, PATCH, TILE_0, TILE_1, TILE_2)
        store = inside
        if ROW_IDS:  # an invalid row id writes nothing (its l is a stand-in 0)
            store = inside & ((weight + tl.zeros([TILE_0, TILE_1, TILE_2], tl.float32)) != 0.0)
        tl.store(grad_imgs_ptr + gi_offs,
                 tl.where(inside, grad_pixels, 0.0).to(grad_imgs_ptr.dtype.element_ty),
                 mask=store)


_REDUCE_BLOCK = 1024


def _pixel_major(imgs) -> bool:
    """channels_last-like strides: a patch row (q, c) is one contiguous run of p*C pixels."""
    C = imgs.shape[1]
    return imgs.stride(3) == C and (C == 1 or imgs.stride(1) == 1)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _launch_args(imgs, patch_size, pixel_dtype=None):
    """Constexprs of a loss kernel launch; ``pixel_dtype`` given: uint8 imgs standing for a
    normalised image of that dtype."""
    C = imgs.shape[1]
    block_c, block_p = _patch_blocks(C, patch_size)
    if _pixel_major(imgs):
        tile = (1, block_p, triton.next_power_of_2(patch_size * C))
    else:
        tile = (block_c, block_p, block_p)
    return dict(PIXEL_MAJOR=_pixel_major(imgs), CHANS=C, PATCH=patch_size,
                NORMALIZE=pixel_dtype is not None, PIXEL_DTYPE=_TL_DTYPE[pixel_dtype or torch.float32],
                TILE_0=tile[0], TILE_1=tile[1], TILE_2=tile[2],
                num_warps=_num_warps(tile[0] * tile[1] * tile[2]))


def _norm_arg(pixel_norm, unused):
    """The norm pointer of a launch: pixel_norm contiguous, or any tensor when not normalising
    (NORMALIZE=False reads nothing through it)."""
    return unused if pixel_norm is None else pixel_norm.contiguous()


def _index_args(mask, row_ids):
    """(mask, row_ids, ROW_IDS) as the kernels take them, contiguous: the one not in use is
    passed as a stand-in pointer (the other tensor) that the kernel never reads."""
    if row_ids is None:
        mask = mask.contiguous()
        return mask, mask, False
    row_ids = row_ids.contiguous()
    return row_ids, row_ids, True


@on_tensor_device
def masked_loss_fwd(imgs, pred, mask, patch_size: int, norm_pix_loss: bool, loss_dtype,
                    pixel_norm=None, pixel_dtype=None, row_ids=None):
    """imgs (N, C, H, W) any strides; pred (N, L, P) any strides; mask (N, L) ->
    (loss 0-dim in loss_dtype, mask_sum 0-dim fp32). uint8 imgs: pixel_norm (2, C) fp32 (mean,
    std rows) and pixel_dtype, the normalised image's dtype.
    row_ids (N, R) int64 (decoder-side masking): pred is (N, R, P), row r of sample n predicts
    patch row_ids[n, r]; mask is not read (pass None); mask_sum = N * R."""
    N, C, H, W = imgs.shape
    L = pred.shape[1]  # rows per sample (R with row_ids)
    img_patches = (H // patch_size) * (W // patch_size)
    mask, row_ids, row_ids_on = _index_args(mask, row_ids)
    patch_loss = torch.empty(N * L, dtype=torch.float32, device=imgs.device)
    loss = torch.empty((), dtype=loss_dtype, device=imgs.device)
    mask_sum = torch.empty((), dtype=torch.float32, device=imgs.device)
    if N * L:
        _masked_loss_fwd_kernel[(N * L,)](
            imgs, pred, mask, row_ids, patch_loss, _norm_arg(pixel_norm, patch_loss),
            L, img_patches, W // patch_size,
            *imgs.stride(), *pred.stride(),
            NORM_PIX=norm_pix_loss, ROW_IDS=row_ids_on, **_launch_args(imgs, patch_size, pixel_dtype))
    _masked_loss_reduce_kernel[(1,)](patch_loss, mask, loss, mask_sum, N * L,
                                     BLOCK=_REDUCE_BLOCK, ROW_IDS=row_ids_on, num_warps=4)
    return loss, mask_sum


@on_tensor_device
def masked_loss_bwd(grad_loss, imgs, pred, mask, mask_sum, patch_size: int,
                    norm_pix_loss: bool, grad_imgs_wanted: bool, pixel_norm=None, pixel_dtype=None,
                    row_ids=None):
    """-> (grad_pred (N, L, P) contiguous in pred's dtype, grad_imgs like imgs or None).
    pixel_norm, pixel_dtype, row_ids: as in ``masked_loss_fwd`` (with row_ids: grad_pred
    (N, R, P); grad_imgs zero elsewhere)."""
    N, C, H, W = imgs.shape
    L = pred.shape[1]  # rows per sample (R with row_ids)
    img_patches = (H // patch_size) * (W // patch_size)
    mask, row_ids, row_ids_on = _index_args(mask, row_ids)
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    fmt = torch.channels_last if _pixel_major(imgs) else torch.contiguous_format
    grad_imgs = (torch.empty(imgs.shape, dtype=imgs.dtype, device=imgs.device, memory_format=fmt)
                 if grad_imgs_wanted else None)
    if grad_imgs_wanted and row_ids_on:
        grad_imgs.zero_()  # only the rows' patches are written
    gi = grad_imgs if grad_imgs_wanted else grad_pred  # unused pointer when not wanted
    gi_strides = grad_imgs.stride() if grad_imgs_wanted else (0, 0, 0, 0)
    if N * L:
        _masked_loss_bwd_kernel[(N * L,)](
            imgs, pred, mask, row_ids, grad_loss, mask_sum, grad_pred, gi, _norm_arg(pixel_norm, grad_pred),
            L, img_patches, W // patch_size,
            *imgs.stride(), *pred.stride(), *gi_strides,
            NORM_PIX=norm_pix_loss, GRAD_IMGS=grad_imgs_wanted, ROW_IDS=row_ids_on,
            **_launch_args(imgs, patch_size, pixel_dtype))
    return grad_pred, grad_imgs
