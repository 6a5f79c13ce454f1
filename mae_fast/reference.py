"""The pure-PyTorch oracle: exactly what facebookresearch/mae ``models_mae.py`` computes, op by op.

Every fast backend (Triton, C++/CUDA, fused attention) is tested against these functions.
They are written the way the official code writes them (same op sequence, same names), only
generalised to ``in_chans != 3`` and non-square images. Keep them short and obviously official.
"""
import torch
import torch.nn.functional as F


def normalize_pixels(imgs: torch.Tensor, pixel_norm: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 imgs (N, C, H, W); pixel_norm (2, C) fp32, rows mean and std -> the float image
    ``(imgs / 255 - mean[c]) / std[c]``, computed in fp32 then rounded once to ``dtype``.

    The same fp32 ops in the same order as torchvision's ToTensor + Normalize
    (``mae_fast.data.to_normalized_tensor``), both divisions true IEEE divisions: the 255 is a
    tensor on the image's device, so CUDA's "divide by a CPU scalar" shortcut (a multiply by the
    rounded reciprocal) does not apply. The Triton kernels compute the same with ``tl.div_rn``.
    """
    C = imgs.shape[1]
    x = imgs.to(torch.float32) / pixel_norm.new_full((), 255.0)
    x = (x - pixel_norm[0].view(1, C, 1, 1)) / pixel_norm[1].view(1, C, 1, 1)
    return x.to(dtype)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: (N, C, H, W) -> x: (N, L, p*p*C), element order (h, w, p, q, c) as the official."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size, in_chans: int) -> torch.Tensor:
    """x: (N, L, p*p*C) -> imgs: (N, C, H, W); grid_size = (h, w) patches."""
    p = patch_size
    h, w = grid_size
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, in_chans, h * p, w * p)


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """len_keep exactly as the official: int(L * (1 - mask_ratio))."""
    return int(num_patches * (1 - mask_ratio))


def masking_indices(noise: torch.Tensor, len_keep: int):
    """The official random_masking's index math, driven by ``noise`` (N, L).

    Returns ids_keep (N, len_keep), ids_restore (N, L), mask (N, L) with 1 = removed
    (mask in the default float dtype, as ``torch.ones`` gives it in the official code).
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep):
    """Encoder input, official order: embed every patch -> + pos -> gather kept -> prepend cls.

    imgs (N, C, H, W); weight (D, C, p, p); bias (D,); pos_embed (1, 1+L, D);
    cls_token (1, 1, D); ids_keep (N, K) -> x (N, 1+K, D)
    """
    p = weight.shape[-1]
    x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)  # (N, L, D)
    x = x + pos_embed[:, 1:, :]
    D = x.shape[-1]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))  # (N, K, D)
    cls_tokens = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat((cls_tokens, x), dim=1)


def unshuffle(x, mask_token, ids_restore, pos_embed=None):
    """Decoder input, official order: append mask tokens -> unshuffle -> re-attach cls -> + pos.

    x (N, 1+K, D) decoder-embedded latent with its cls row; mask_token (1, 1, D);
    ids_restore (N, L); pos_embed (1, 1+L, D) or None -> (N, 1+L, D)
    """
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
    if pos_embed is not None:
        x = x + pos_embed
    return x


def num_decode(len_mask: int, decoder_mask_ratio: float) -> int:
    """Masked patches the decoder reconstructs under decoder-side masking (not in the official
    code): int(len_mask * (1 - decoder_mask_ratio)), the same rounding as ``num_keep``."""
    return int(len_mask * (1 - decoder_mask_ratio))


def decoder_ids(ids_restore: torch.Tensor, len_keep: int, len_decode: int) -> torch.Tensor:
    """Decoder-side masking (not in the official code): the patch of each decoder row.

    ids_restore (N, L) -> ids_decode (N, len_keep + len_decode) = ids_shuffle[:, :K+M]: the
    len_keep visible patches (in ids_keep's order), then the first len_decode masked patches in
    noise order (a uniformly random subset of the masked ones, fixed by ``noise``). The rest of
    the masked patches (noise order len_keep + len_decode ..) are dropped before the decoder.
    """
    ids_shuffle = torch.argsort(ids_restore, dim=1)  # the inverse permutation
    return ids_shuffle[:, :len_keep + len_decode]


def unshuffle_subset(x, mask_token, ids_restore, len_decode: int, pos_embed=None):
    """Decoder input under decoder-side masking: cls + visible tokens + len_decode mask tokens,
    in decoder order (``decoder_ids``), each with the positional row of its patch.

    x (N, 1+K, D); mask_token (1, 1, D); ids_restore (N, L); pos_embed (1, 1+L, D) or None
    -> (N, 1+K+M, D) with M = len_decode; row 1+s holds patch ``decoder_ids(...)[n, s]``.
    """
    N, K, D = x.shape[0], x.shape[1] - 1, x.shape[2]
    mask_tokens = mask_token.repeat(N, len_decode, 1)
    x = torch.cat([x, mask_tokens], dim=1)  # cls, visible, decoded mask tokens
    if pos_embed is not None:
        ids_decode = decoder_ids(ids_restore, K, len_decode)  # (N, K+M)
        pos = torch.gather(pos_embed[:, 1:, :].expand(N, -1, -1), dim=1,
                           index=ids_decode.unsqueeze(-1).repeat(1, 1, D))
        x = x + torch.cat([pos_embed[:, :1, :].expand(N, -1, -1), pos], dim=1)
    return x


def masked_loss_subset(imgs, pred_rows, ids_rows, patch_size: int, norm_pix_loss: bool):
    """Loss of decoder-side masking: the mean per-patch loss over the given rows only.

    imgs (N, C, H, W); pred_rows (N, M, p*p*C) predictions of patches ids_rows (N, M) -> scalar
    = mean over the N*M rows of mean_j (pred - target)^2 (the official loss with mask = 1 on
    exactly these patches).
    """
    return masked_loss_subset_on_target(patchify(imgs, patch_size), pred_rows, ids_rows, norm_pix_loss)


def masked_loss_subset_on_target(target, pred_rows, ids_rows, norm_pix_loss: bool):
    """target (N, L, p*p*C); pred_rows (N, M, p*p*C); ids_rows (N, M) -> ``masked_loss_subset``."""
    target = torch.gather(target, dim=1, index=ids_rows.unsqueeze(-1).repeat(1, 1, target.shape[2]))
    if norm_pix_loss:
        target = norm_pix_target(target)
    loss = (pred_rows - target) ** 2
    loss = loss.mean(dim=-1)  # [N, M], mean loss per decoded patch
    return loss.sum() / loss.numel()


def masked_loss(imgs, pred, mask, patch_size: int, norm_pix_loss: bool):
    """imgs (N, C, H, W); pred (N, L, p*p*C); mask (N, L), 1 = removed -> scalar loss."""
    return masked_loss_on_target(patchify(imgs, patch_size), pred, mask, norm_pix_loss)


def masked_loss_on_target(target, pred, mask, norm_pix_loss: bool):
    """target, pred (N, L, p*p*C); mask (N, L), 1 = removed -> scalar loss (official forward_loss)."""
    if norm_pix_loss:
        target = norm_pix_target(target)
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
    return (loss * mask).sum() / mask.sum()  # mean loss on removed patches


def norm_pix_target(target):
    """The official norm_pix_loss target: each patch (last dim) to zero mean, unit (unbiased) var."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5


def attention(q, k, v, scale: float):
    """q, k, v (B, H, M, K) -> (out (B, H, M, K), attn (B, H, M, M)): softmax(q k^T * scale) v."""
    attn = (q @ k.transpose(-2, -1)) * scale  # timm 0.3.2's order, as the official blocks
    attn = attn.softmax(dim=-1)
    return attn @ v, attn
