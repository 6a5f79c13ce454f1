"""Encoder input: patchify + gather of the kept patches + patch-embed + positions + cls.

Fast path (``impl == "triton"``), three steps, two of them Triton torch ops:
  1. ``mae_fast::gather_patches``  imgs (N, C, H, W) + ids_keep (N, K) -> patches (N, K, C*p*p)
     in the Conv2d weight's (c, p, q) order, read straight from the image (any strides);
  2. ``F.linear(patches, weight.view(D, -1), bias)``: the patch embed, on kept patches only;
  3. ``mae_fast::add_pos_cls``  -> (N, 1+K, D): kept rows + pos_embed[1 + ids_keep], and the
     cls row cls_token + pos_embed[0], written once.
Same numbers as the official order (embed all -> + pos -> gather -> cat cls), since the embed
is per patch. Each op is a ``torch.library.custom_op`` with a fake impl (meta tensors,
``torch.compile(fullgraph=True)``) and registered autograd; the op bodies launch Triton where
``backends.triton_probe`` says it runs (CUDA, or CPU under TRITON_INTERPRET=1) and run a torch
version of the same gather elsewhere. ``torch.library.triton_op`` is not used: under the
interpreter on CPU it fails ("invalid python storage"), see DESIGN.md.

Backward: ``mae_fast::add_pos_cls_backward`` (one kernel: contiguous grad_x + grad_cls), then
F.linear's (weight-gradient mm, bias sum), then ``scatter_patches`` only if imgs requires grad.

Stretch, opt-in with ``MAE_FAST_PATCH_EMBED=gemm``: ``mae_fast::patch_embed_gemm`` does all three
steps in one Triton GEMM (gather prologue, pos/cls epilogue), and
``mae_fast::patch_embed_gemm_backward`` all parameter gradients in one kernel (gather prologue
again): 2 ops for the encoder input, forward + backward. Its GPU speed is not measured, hence
opt-in (docs/TRITON.md says why).
"""
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import choose, register_fast, triton_probe
from ._checks import check_ids

OP = "patch_embed_masked"
register_fast(OP, "triton", triton_probe)

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_runs(device: torch.device) -> bool:
    return triton_probe(device)[0]


# ---- 1. gather of kept patches ------------------------------------------------------------

def _patch_rows(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Torch view of the same index map as the kernel: (N, C, H, W) -> (N, L, C*p*p), (c, p, q);
    rows and columns past the last whole patch are dropped, as the strided Conv2d does."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs[:, :, :h * p, :w * p].reshape(N, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)


@torch.library.custom_op("mae_fast::gather_patches", mutates_args=())
def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs (N, C, H, W); ids_keep (N, K) -> patches (N, K, C*p*p) in (c, p, q) order."""
    N, C, H, W = imgs.shape
    check_ids(ids_keep, (H // patch_size) * (W // patch_size), "ids_keep")
    if _triton_runs(imgs.device):
        from ..kernels import patch_gather
        return patch_gather.gather_patches(imgs, ids_keep, patch_size)
    rows = _patch_rows(imgs, patch_size)  # (N, L, C*p*p)
    return torch.gather(rows, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, rows.shape[-1]))


@gather_patches.register_fake
def _(imgs, ids_keep, patch_size):
    N, C = imgs.shape[:2]
    return imgs.new_empty((N, ids_keep.shape[1], C * patch_size * patch_size))


@torch.library.custom_op("mae_fast::gather_patches_normalized", mutates_args=())
def gather_patches_normalized(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                              pixel_norm: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """uint8 imgs (N, C, H, W); ids_keep (N, K); pixel_norm (2, C) fp32 (mean, std rows) ->
    patches (N, K, C*p*p) in out_dtype, (c, p, q) order: ``(x / 255 - mean[c]) / std[c]`` in
    fp32, rounded once to out_dtype. Equal to ``gather_patches`` on
    ``reference.normalize_pixels(imgs, pixel_norm, out_dtype)``, without that float image: the
    kernel reads the kept uint8 pixels and normalises them in registers. No autograd: uint8
    images take no gradient and the statistics are constants (the public op checks)."""
    N, C, H, W = imgs.shape
    check_ids(ids_keep, (H // patch_size) * (W // patch_size), "ids_keep")
    if _triton_runs(imgs.device):
        from ..kernels import patch_gather
        return patch_gather.gather_patches_normalized(imgs, ids_keep, patch_size, pixel_norm,
                                                      out_dtype)
    p = patch_size
    rows = _patch_rows(imgs, p)  # (N, L, C*p*p) uint8
    kept = torch.gather(rows, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
    # the kept patches as (N*K, C, p, p) images: the reference's per-channel math on them only
    return reference.normalize_pixels(kept.reshape(-1, C, p, p), pixel_norm, out_dtype) \
        .reshape(N, ids_keep.shape[1], C * p * p)


@gather_patches_normalized.register_fake
def _(imgs, ids_keep, patch_size, pixel_norm, out_dtype):
    N, C = imgs.shape[:2]
    return imgs.new_empty((N, ids_keep.shape[1], C * patch_size * patch_size), dtype=out_dtype)


@torch.library.custom_op("mae_fast::scatter_patches", mutates_args=())
def scatter_patches(grad_patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                    height: int, width: int, channels_last: bool) -> torch.Tensor:
    """gather_patches' backward: grad_patches (N, K, C*p*p) -> grad_imgs (N, C, H, W), zero
    outside the kept patches. ids_keep must be distinct per row (random masking's are)."""
    N, K, _ = grad_patches.shape
    C = grad_patches.shape[2] // (patch_size * patch_size)
    check_ids(ids_keep, (height // patch_size) * (width // patch_size), "ids_keep", distinct=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_imgs = torch.empty((N, C, height, width), dtype=grad_patches.dtype,
                            device=grad_patches.device, memory_format=fmt).zero_()
    if _triton_runs(grad_patches.device):
        from ..kernels import patch_gather
        return patch_gather.scatter_patches(grad_patches, ids_keep, patch_size, grad_imgs)
    rows = _patch_rows(grad_imgs, patch_size).clone()  # (N, L, C*p*p)
    rows.scatter_(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, rows.shape[-1]), grad_patches)
    p = patch_size
    h, w = height // p, width // p
    grad_imgs[:, :, :h * p, :w * p] = rows.reshape(N, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5) \
        .reshape(N, C, h * p, w * p)
    return grad_imgs


@scatter_patches.register_fake
def _(grad_patches, ids_keep, patch_size, height, width, channels_last):
    N = grad_patches.shape[0]
    C = grad_patches.shape[2] // (patch_size * patch_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((N, C, height, width), dtype=grad_patches.dtype, device=grad_patches.device,
                       memory_format=fmt)


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.patch_size = patch_size
    ctx.height, ctx.width = imgs.shape[2], imgs.shape[3]
    ctx.channels_last = (imgs.dim() == 4 and not imgs.is_contiguous()
                         and imgs.is_contiguous(memory_format=torch.channels_last))


def _gather_backward(ctx, grad_patches):
    (ids_keep,) = ctx.saved_tensors
    grad_imgs = None
    if ctx.needs_input_grad[0]:
        grad_imgs = scatter_patches(grad_patches, ids_keep, ctx.patch_size,
                                    ctx.height, ctx.width, ctx.channels_last)
    return grad_imgs, None, None


gather_patches.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---- 3. positions + cls --------------------------------------------------------------------

def _tokens_dtype(x, pos_embed, cls_token) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, pos_embed.dtype), cls_token.dtype)


@torch.library.custom_op("mae_fast::add_pos_cls", mutates_args=())
def add_pos_cls(x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor,
                ids_keep: torch.Tensor) -> torch.Tensor:
    """x (N, K, D) embedded kept patches; pos_embed (1, 1+L, D); cls_token (1, 1, D);
    ids_keep (N, K) -> (N, 1+K, D): [cls + pos[0], x[:, k] + pos[1 + ids_keep[:, k]]]."""
    check_ids(ids_keep, pos_embed.shape[1] - 1, "ids_keep")
    out_dtype = _tokens_dtype(x, pos_embed, cls_token)
    if _triton_runs(x.device):
        from ..kernels import patch_gather
        return patch_gather.add_pos_cls(x, pos_embed, cls_token, ids_keep, out_dtype)
    kept = x + pos_embed[0, 1:][ids_keep.long()]  # (N, K, D)
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat((cls, kept), dim=1).to(out_dtype)


@add_pos_cls.register_fake
def _(x, pos_embed, cls_token, ids_keep):
    N, K, D = x.shape
    return x.new_empty((N, 1 + K, D), dtype=_tokens_dtype(x, pos_embed, cls_token))


def _add_pos_cls_setup(ctx, inputs, output):
    x, pos_embed, cls_token, ids_keep = inputs
    ctx.save_for_backward(ids_keep)
    ctx.dtypes = (x.dtype, pos_embed.dtype, cls_token.dtype)
    ctx.pos_shape = pos_embed.shape


def _pos_cls_grads(grad_out, ids_keep, pos_shape, pos_dtype, cls_dtype, want_pos, want_cls):
    """Gradients of the pos/cls epilogue: grad_out (N, 1+K, D) -> (grad_pos_embed, grad_cls_token)."""
    grad_pos = grad_cls = None
    if want_cls:
        grad_cls = grad_out[:, :1].sum(0, keepdim=True).to(cls_dtype)
    if want_pos:  # pos_embed is frozen in MAE; correct anyway
        D = grad_out.shape[-1]
        grad_pos = grad_out.new_zeros(pos_shape[1:])  # (1+L, D)
        grad_pos.index_add_(0, 1 + ids_keep.reshape(-1).long(), grad_out[:, 1:].reshape(-1, D))
        grad_pos[0] += grad_out[:, 0].sum(0)
        grad_pos = grad_pos.unsqueeze(0).to(pos_dtype)
    return grad_pos, grad_cls


@torch.library.custom_op("mae_fast::add_pos_cls_backward", mutates_args=())
def add_pos_cls_backward(grad_out: torch.Tensor, x_dtype: torch.dtype,
                         cls_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """add_pos_cls' backward in one op: grad_out (N, 1+K, D) -> grad_x (N, K, D), contiguous, in
    x_dtype (what F.linear's backward needs, so it makes no copy) and grad_cls (1, 1, D) in
    cls_dtype = the batch sum of row 0 (fp32 accumulation, rows in order: deterministic)."""
    if _triton_runs(grad_out.device):
        from ..kernels import patch_gather
        return patch_gather.add_pos_cls_backward(grad_out, x_dtype, cls_dtype)
    grad_x = grad_out[:, 1:].to(x_dtype, memory_format=torch.contiguous_format, copy=True)
    grad_cls = grad_out[:, :1].sum(0, keepdim=True, dtype=torch.float32).to(cls_dtype)
    return grad_x, grad_cls


@add_pos_cls_backward.register_fake
def _(grad_out, x_dtype, cls_dtype):
    N, T, D = grad_out.shape
    return (grad_out.new_empty((N, T - 1, D), dtype=x_dtype),
            grad_out.new_empty((1, 1, D), dtype=cls_dtype))


def _add_pos_cls_backward(ctx, grad_out):
    (ids_keep,) = ctx.saved_tensors
    x_dtype, pos_dtype, cls_dtype = ctx.dtypes
    grad_x = grad_cls = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        grad_x, grad_cls = add_pos_cls_backward(grad_out, x_dtype, cls_dtype)
    grad_pos, _ = _pos_cls_grads(grad_out, ids_keep, ctx.pos_shape, pos_dtype, cls_dtype,
                                 ctx.needs_input_grad[1], False)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_pos,
            grad_cls if ctx.needs_input_grad[2] else None, None)


add_pos_cls.register_autograd(_add_pos_cls_backward, setup_context=_add_pos_cls_setup)


# ---- stretch: the whole encoder input as one Triton GEMM -----------------------------------

def _gemm_out_dtype(compute_dtype, pos_embed, cls_token) -> torch.dtype:
    """The reference's dtype: conv output (compute dtype) + pos, cat with cls + pos."""
    return torch.promote_types(torch.promote_types(compute_dtype, pos_embed.dtype), cls_token.dtype)


@torch.library.custom_op("mae_fast::patch_embed_gemm", mutates_args=())
def patch_embed_gemm(imgs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     pos_embed: torch.Tensor, cls_token: torch.Tensor, ids_keep: torch.Tensor,
                     compute_dtype: torch.dtype, pixel_norm: Optional[torch.Tensor] = None,
                     pixel_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One kernel: gather of kept patches (prologue) -> GEMM with the flattened Conv2d weight
    in ``compute_dtype`` (fp32 accumulation) -> + bias + pos rows, cls row (epilogue).
    -> tokens (N, 1+K, D). uint8 imgs: ``pixel_norm`` (2, C) fp32 and ``pixel_dtype`` (see
    gather_patches_normalized); the prologue normalises the pixels it loads."""
    p = weight.shape[-1]
    check_ids(ids_keep, (imgs.shape[2] // p) * (imgs.shape[3] // p), "ids_keep")
    out_dtype = _gemm_out_dtype(compute_dtype, pos_embed, cls_token)
    if _triton_runs(imgs.device):
        from ..kernels import patch_embed_gemm as kernels
        return kernels.patch_embed_gemm(imgs, weight, bias, pos_embed, cls_token, ids_keep,
                                        compute_dtype, out_dtype, pixel_norm, pixel_dtype)
    x = F.linear(_kept_patches(imgs, ids_keep, p, pixel_norm, pixel_dtype).to(compute_dtype),
                 weight.reshape(weight.shape[0], -1).to(compute_dtype),
                 None if bias is None else bias.to(compute_dtype))
    return add_pos_cls(x, pos_embed, cls_token, ids_keep).to(out_dtype)


def _kept_patches(imgs, ids_keep, p, pixel_norm, pixel_dtype):
    """(N, K, C*p*p) kept patches of a float image, or normalised ones of a uint8 image."""
    if pixel_norm is None:
        return gather_patches(imgs, ids_keep, p)
    return gather_patches_normalized(imgs, ids_keep, p, pixel_norm, pixel_dtype)


@patch_embed_gemm.register_fake
def _(imgs, weight, bias, pos_embed, cls_token, ids_keep, compute_dtype, pixel_norm=None,
      pixel_dtype=None):
    return imgs.new_empty((imgs.shape[0], 1 + ids_keep.shape[1], weight.shape[0]),
                          dtype=_gemm_out_dtype(compute_dtype, pos_embed, cls_token))


@torch.library.custom_op("mae_fast::patch_embed_gemm_backward", mutates_args=())
def patch_embed_gemm_backward(grad_out: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor,
                              weight_shape: List[int], compute_dtype: torch.dtype,
                              weight_dtype: torch.dtype, bias_dtype: torch.dtype,
                              cls_dtype: torch.dtype, pixel_norm: Optional[torch.Tensor] = None,
                              pixel_dtype: Optional[torch.dtype] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """patch_embed_gemm's parameter gradients in one op: grad_out (N, 1+K, D) ->
    grad_weight (D, C, p, p) = grad_tokens^T @ patches (the kept patches read straight from
    imgs, not saved), grad_bias (D,) = column sums of grad_tokens, grad_cls (1, 1, D) = batch
    sum of row 0, where grad_tokens = grad_out[:, 1:] in the forward's compute dtype (as the
    reference's Conv2d backward sees it); fp32 accumulation, deterministic."""
    if _triton_runs(grad_out.device):
        from ..kernels import patch_embed_gemm as kernels
        return kernels.patch_embed_gemm_backward(grad_out, imgs, ids_keep, weight_shape,
                                                 compute_dtype, weight_dtype, bias_dtype, cls_dtype,
                                                 pixel_norm, pixel_dtype)
    D, p = weight_shape[0], weight_shape[-1]
    grad_tokens = grad_out[:, 1:].to(compute_dtype)  # (N, K, D)
    patches = _kept_patches(imgs, ids_keep, p, pixel_norm, pixel_dtype).to(compute_dtype)  # (N, K, C*p*p)
    grad_weight = grad_tokens.reshape(-1, D).t() @ patches.reshape(-1, patches.shape[-1])
    grad_bias = grad_tokens.sum((0, 1), dtype=torch.float32)
    grad_cls = grad_out[:, :1].sum(0, keepdim=True, dtype=torch.float32)
    return (grad_weight.reshape(weight_shape).to(weight_dtype), grad_bias.to(bias_dtype),
            grad_cls.to(cls_dtype))


@patch_embed_gemm_backward.register_fake
def _(grad_out, imgs, ids_keep, weight_shape, compute_dtype, weight_dtype, bias_dtype, cls_dtype,
      pixel_norm=None, pixel_dtype=None):
    D = weight_shape[0]
    return (grad_out.new_empty(tuple(weight_shape), dtype=weight_dtype),
            grad_out.new_empty((D,), dtype=bias_dtype), grad_out.new_empty((1, 1, D), dtype=cls_dtype))


def _gemm_setup(ctx, inputs, output):
    imgs, weight, bias, pos_embed, cls_token, ids_keep, compute_dtype, pixel_norm, pixel_dtype = inputs
    ctx.save_for_backward(imgs, weight if ctx.needs_input_grad[0] else None, ids_keep, pixel_norm)
    ctx.pixel_dtype = pixel_dtype  # uint8 imgs (saved as uint8: a quarter of an fp32 image)
    ctx.imgs_meta = (imgs.shape, imgs.dtype, imgs.dim() == 4 and not imgs.is_contiguous()
                     and imgs.is_contiguous(memory_format=torch.channels_last))
    ctx.weight_meta = (list(weight.shape), weight.dtype)
    ctx.dtypes = (None if bias is None else bias.dtype, pos_embed.dtype, cls_token.dtype)
    ctx.pos_shape = pos_embed.shape
    ctx.compute_dtype = compute_dtype


def _gemm_backward(ctx, grad_out):
    """grad_out (N, 1+K, D). Weight, bias and cls gradients: one op (patch_embed_gemm_backward,
    one Triton kernel). grad_imgs (rare: images seldom require grad): a matmul in the compute
    dtype + scatter_patches; grad_pos (frozen in MAE): the split path's torch code."""
    imgs, weight, ids_keep, pixel_norm = ctx.saved_tensors
    imgs_shape, imgs_dtype, channels_last = ctx.imgs_meta
    weight_shape, weight_dtype = ctx.weight_meta
    bias_dtype, pos_dtype, cls_dtype = ctx.dtypes
    compute_dtype = ctx.compute_dtype
    D, p = weight_shape[0], weight_shape[-1]
    grad_imgs = grad_weight = grad_bias = grad_cls = None
    if ctx.needs_input_grad[0]:
        grad_tokens = grad_out[:, 1:].to(compute_dtype)  # (N, K, D)
        grad_patches = grad_tokens @ weight.reshape(D, -1).to(compute_dtype)  # (N, K, C*p*p)
        grad_imgs = scatter_patches(grad_patches.to(imgs_dtype), ids_keep, p, imgs_shape[2],
                                    imgs_shape[3], channels_last)
    if any(ctx.needs_input_grad[i] for i in (1, 2, 4)):
        grad_weight, grad_bias, grad_cls = patch_embed_gemm_backward(
            grad_out, imgs, ids_keep, weight_shape, compute_dtype, weight_dtype,
            bias_dtype or weight_dtype, cls_dtype, pixel_norm, ctx.pixel_dtype)
    grad_pos, _ = _pos_cls_grads(grad_out, ids_keep, ctx.pos_shape, pos_dtype, cls_dtype,
                                 ctx.needs_input_grad[3], False)
    keep = lambda i, g: g if ctx.needs_input_grad[i] else None  # noqa: E731
    return (grad_imgs, keep(1, grad_weight), keep(2, grad_bias), grad_pos, keep(4, grad_cls),
            None, None, None, None)


patch_embed_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup)


def _use_gemm_kernel() -> bool:
    """MAE_FAST_PATCH_EMBED=gemm picks the one-kernel GEMM (stretch; GPU speed not measured);
    the default "split" is gather -> cuBLAS (F.linear) -> pos/cls epilogue."""
    mode = os.environ.get("MAE_FAST_PATCH_EMBED", "split")
    if mode not in ("split", "gemm"):
        raise ValueError(f"MAE_FAST_PATCH_EMBED must be 'split' or 'gemm', got {mode!r}")
    return mode == "gemm"


# ---- the public op -------------------------------------------------------------------------

def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _check_inputs(imgs, weight, bias, pos_embed, cls_token, ids_keep) -> Tuple[int, int]:
    """Shapes and dtypes the fast path relies on -> (patch_size, num_patches)."""
    check_same_device(imgs=imgs, weight=weight, bias=bias, pos_embed=pos_embed,
                      cls_token=cls_token, ids_keep=ids_keep)
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    if weight.dim() != 4 or weight.shape[1] != C or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D, {C}, p, p), got {tuple(weight.shape)}")
    D, p = weight.shape[0], weight.shape[-1]
    if H < p or W < p:
        raise ValueError(f"image {H}x{W} is smaller than one patch {p}x{p}")
    L = (H // p) * (W // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be ({D},), got {tuple(bias.shape)}")
    if tuple(pos_embed.shape) != (1, 1 + L, D):
        raise ValueError(f"pos_embed must be (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
    if tuple(cls_token.shape) != (1, 1, D):
        raise ValueError(f"cls_token must be (1, 1, {D}), got {tuple(cls_token.shape)}")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != N:
        raise ValueError(f"ids_keep must be ({N}, K), got {tuple(ids_keep.shape)}")
    if ids_keep.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids_keep must be int64 or int32, got {ids_keep.dtype}")
    return p, L


def fast_dtypes_ok(*tensors) -> bool:
    return all(t.dtype in FAST_DTYPES for t in tensors)


# ---- uint8 images: normalisation fused into the image reads ------------------------------

def check_pixel_norm(imgs, pixel_norm, pixel_dtype) -> None:
    """uint8 imgs need ``pixel_norm`` (2, C) fp32 (mean row, std row, no grad, imgs' device)
    and ``pixel_dtype``, the float dtype the normalised image stands for; float imgs take
    neither. Anything else -> a clear error."""
    if imgs.dtype != torch.uint8:
        if pixel_norm is not None or pixel_dtype is not None:
            raise TypeError(f"pixel_norm / pixel_dtype apply to uint8 images only, got {imgs.dtype}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be floating point, or uint8 with pixel_norm, got {imgs.dtype}")
        return
    if pixel_norm is None or pixel_dtype is None:
        raise TypeError("uint8 imgs need pixel_norm (2, C) fp32 (mean, std) and pixel_dtype")
    C = imgs.shape[1] if imgs.dim() == 4 else None
    if pixel_norm.dtype != torch.float32 or tuple(pixel_norm.shape) != (2, C):
        raise ValueError(f"pixel_norm must be (2, {C}) float32 (mean row, std row), got "
                         f"{tuple(pixel_norm.shape)} {pixel_norm.dtype}")
    if pixel_norm.requires_grad:
        raise ValueError("pixel_norm is a constant of the input pipeline: it takes no gradient")
    if not (isinstance(pixel_dtype, torch.dtype) and pixel_dtype.is_floating_point):
        raise TypeError(f"pixel_dtype must be a floating-point dtype, got {pixel_dtype!r}")
    check_same_device(imgs=imgs, pixel_norm=pixel_norm)


def float_pixels(imgs, pixel_norm, pixel_dtype):
    """The float image a uint8 ``imgs`` stands for (the reference paths normalise first and run
    the float code); float ``imgs`` unchanged."""
    if imgs.dtype != torch.uint8:
        return imgs
    return reference.normalize_pixels(imgs, pixel_norm, pixel_dtype)


def patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, *, backend="auto",
                       pixel_norm=None, pixel_dtype=None):
    """imgs (N, C, H, W); weight (D, C, p, p); bias (D,); pos_embed (1, 1+L, D);
    cls_token (1, 1, D); ids_keep (N, K) -> encoder tokens (N, 1+K, D).

    uint8 imgs: ``pixel_norm`` (2, C) fp32 (mean, std rows) and ``pixel_dtype`` say which float
    image they stand for, ``reference.normalize_pixels(imgs, pixel_norm, pixel_dtype)``; the
    result equals that image's. The fast path normalises the kept pixels inside the gather (no
    float image); the reference normalises the image first."""
    check_pixel_norm(imgs, pixel_norm, pixel_dtype)
    choice = choose(OP, imgs.device, backend)
    if choice.impl == "reference":
        return reference.patch_embed_masked(float_pixels(imgs, pixel_norm, pixel_dtype), weight,
                                            bias, pos_embed, cls_token, ids_keep)
    # the kernels compute in fp32 at most: a float64 image, weight, table or token runs the
    # reference rather than losing precision silently
    pixels_dtype = pixel_dtype or imgs.dtype  # a uint8 image's: the float image it stands for
    if pixels_dtype not in FAST_DTYPES or not fast_dtypes_ok(weight, pos_embed, cls_token):
        if backend == "fast":
            raise TypeError(f"backend='fast': {OP} supports imgs, weight, pos_embed and cls_token in "
                            f"{FAST_DTYPES}, got {pixels_dtype}, {weight.dtype}, {pos_embed.dtype}, "
                            f"{cls_token.dtype}")
        return reference.patch_embed_masked(float_pixels(imgs, pixel_norm, pixel_dtype), weight,
                                            bias, pos_embed, cls_token, ids_keep)
    p, _ = _check_inputs(imgs, weight, bias, pos_embed, cls_token, ids_keep)
    if _use_gemm_kernel():
        if imgs.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(imgs.device.type):
            compute_dtype = torch.get_autocast_dtype(imgs.device.type)
        else:
            compute_dtype = torch.promote_types(pixels_dtype, weight.dtype)
        return patch_embed_gemm(imgs, weight, bias, pos_embed, cls_token, ids_keep, compute_dtype,
                                pixel_norm, pixel_dtype)
    if pixel_norm is None:
        patches = gather_patches(imgs, ids_keep, p)  # (N, K, C*p*p)
    else:
        patches = gather_patches_normalized(imgs, ids_keep, p, pixel_norm, pixel_dtype)
    x = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (N, K, D)
    return add_pos_cls(x, pos_embed, cls_token, ids_keep)  # (N, 1+K, D)
