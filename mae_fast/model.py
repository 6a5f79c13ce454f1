"""MaskedAutoencoderViT: a drop-in for facebookresearch/mae ``models_mae.py``.

Same constructor, same methods, same ``forward(imgs, mask_ratio=0.75) -> (loss, pred, mask)``,
same state_dict keys. One opt-in extension, off by default: ``decoder_mask_ratio`` (decoder-side
masking, see ``forward``). The memory-bound glue (encoder input, decoder input, loss) goes through
``mae_fast.ops``, whose backends are chosen by ``mae_fast.backends``; ``backend="reference"``
runs the official math everywhere.
"""
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from .attention import check_attn_backend
from .backends import check_backend, choose
from .layers import Block, PatchEmbed, to_2tuple
from .pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with VisionTransformer backbone"""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 *, backend="auto", attn_backend=None, input_mean=None, input_std=None,
                 decoder_mask_ratio=0.0):
        super().__init__()
        self.backend = check_backend(backend)
        self.set_decoder_mask_ratio(decoder_mask_ratio)
        # --------------------------------------------------------------------------
        # MAE encoder specifics
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos embedding

        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        # --------------------------------------------------------------------------

        # --------------------------------------------------------------------------
        # MAE decoder specifics
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))

        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)  # fixed sin-cos embedding

        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
            for i in range(decoder_depth)])

        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)  # decoder to patch
        # --------------------------------------------------------------------------

        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.set_attn_backend(attn_backend)
        self.set_fused_blocks(True)
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.mlp.backend = self.backend  # the opt-in MLP GEMMs (MAE_FAST_MLP=gemm) follow backend
            blk.attn.gemm_backend = self.backend  # and the qkv weight-gradient GEMM
        self.set_input_normalization(input_mean, input_std)
        self.initialize_weights()

    @property
    def backend(self) -> str:
        """The glue ops' and the fused LayerNorms' backend (``mae_fast.backends``); setting it
        reaches every block."""
        return self._backend

    @backend.setter
    def backend(self, backend: str):
        self._backend = check_backend(backend)
        for blk in list(getattr(self, "blocks", ())) + list(getattr(self, "decoder_blocks", ())):
            blk.backend = self._backend

    def set_input_normalization(self, mean=None, std=None):
        """Lets ``forward`` take uint8 images (N, C, H, W), pixel values 0..255: each is read as
        ``(x / 255 - mean[c]) / std[c]`` in fp32 (ToTensor + Normalize, as
        ``mae_fast.data.to_normalized_tensor``), rounded to the model's dtype, the float image
        the uint8 one stands for. The fused path normalises inside the patch gather and the
        loss's target load, so no float image is made; the reference normalises first. Float
        images are unaffected. ``mean``, ``std``: C numbers each (std > 0); both None clears.
        Kept as ``self.pixel_norm`` (2, C) fp32, a plain tensor attribute that follows the
        model's device: not a buffer, so not in state_dict (checkpoints load unchanged) and not
        broadcast by DDP every step (DDP broadcasts buffers; this model has none)."""
        if mean is None and std is None:
            self._pixel_norm_values = None
            self.pixel_norm = None
            return
        C = self.in_chans
        try:
            values = torch.as_tensor([[float(v) for v in mean], [float(v) for v in std]],
                                     dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"mean and std must be sequences of {C} numbers, got {mean!r}, {std!r}") from e
        if values.shape[1] != C or len(mean) != len(std):
            raise ValueError(f"mean and std need {C} values each (in_chans={C}), got {len(mean)} and {len(std)}")
        if not bool(torch.isfinite(values).all()) or not bool((values[1] > 0).all()):
            raise ValueError(f"mean must be finite and std finite and > 0, got {mean!r}, {std!r}")
        # python floats -> fp32, as torch.tensor(mean, dtype=torch.float32) rounds them
        self._pixel_norm_values = values.tolist()
        self.pixel_norm = torch.tensor(self._pixel_norm_values, dtype=torch.float32,
                                       device=self.cls_token.device)  # (2, C): mean, std

    def _apply(self, fn, *args, **kwargs):
        """``pixel_norm`` follows .to(device) / .cuda() / .to_empty(); rebuilt from the exact
        values in fp32 (.to(bfloat16) / .half() would round the statistics)."""
        out = super()._apply(fn, *args, **kwargs)
        if self.pixel_norm is not None:
            self.pixel_norm = torch.tensor(self._pixel_norm_values, dtype=torch.float32,
                                           device=fn(self.pixel_norm).device)
        return out

    def normalize_input(self, imgs):
        """uint8 imgs -> the float image they stand for (see set_input_normalization), in the
        model's dtype; float imgs unchanged."""
        if imgs.dtype != torch.uint8:
            return imgs
        args = self._pixel_args(imgs)
        return reference.normalize_pixels(imgs, args["pixel_norm"], args["pixel_dtype"])

    def _pixel_args(self, imgs) -> dict:
        """The ops' pixel_norm / pixel_dtype keywords for these images ({} for float images)."""
        if imgs.dtype != torch.uint8:
            return {}
        if self.pixel_norm is None:
            raise TypeError("uint8 images need the input normalisation: "
                            "MaskedAutoencoderViT(..., input_mean=..., input_std=...) or "
                            "model.set_input_normalization(mean, std)")
        return dict(pixel_norm=self.pixel_norm, pixel_dtype=self.cls_token.dtype)

    def set_attn_backend(self, attn_backend=None):
        """Attention backend of every block (see ``mae_fast.attention``); None follows ``backend``."""
        if attn_backend is None:
            attn_backend = "math" if self.backend == "reference" else "auto"
        attn_backend = check_attn_backend(attn_backend)  # ValueError for an unknown name
        self.attn_backend = attn_backend
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.attn.backend = attn_backend

    def set_fused_blocks(self, fused: bool = True):
        """True (default): every block's qkv projection + attention runs
        ``mae_fast.attention.qkv_attention``'s fused backward (no d(qkv) merge), and each residual
        add runs with the LayerNorm after it (``mae_fast.ops.add_layer_norm``: norm2, the next
        block's norm1, the final norm); with ``MAE_FAST_MLP=gemm`` (where the MLP runs the
        Triton GEMMs) the blocks' stream form instead: each residual add in the proj / fc2 GEMM
        epilogue, the LayerNorms without an add (``Block.stream_runs``); False: the plain
        blocks, for A/B comparisons. Same math either way."""
        self.fused_blocks = bool(fused)
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.attn.fused_qkv = bool(fused)
            blk.fused_norm = bool(fused)
            blk.backend = self.backend

    def set_decoder_mask_ratio(self, decoder_mask_ratio: float = 0.0):
        """Decoder-side masking (see ``forward``): the fraction of the encoder-masked patches
        dropped before the decoder; 0 (default) is the official model."""
        self.decoder_mask_ratio = self._check_decoder_mask_ratio(decoder_mask_ratio)

    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing: each encoder/decoder block keeps only its input and is
        recomputed in the backward pass (less memory, one more block forward per step)."""
        self.grad_checkpointing = bool(enable)

    def _block(self, blk, x):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _blocks_then_norm(self, blocks, norm, x):
        """``for blk in blocks: x = blk(x)``, then ``norm(x)``. With fused blocks each block's
        last residual add is left pending (``Block.forward_pending``) and runs with the next
        LayerNorm: the next block's norm1, or ``norm`` after the last block. Per block (grad
        checkpointing keeps only each block's input), or with a replaced / hooked block, the
        blocks run one by one. Where every block runs its stream form (``Block.stream_runs``:
        MAE_FAST_MLP=gemm, the residual adds in the proj / fc2 GEMM epilogues) nothing is
        pending: the blocks run one by one and the final norm is a LayerNorm without an add."""
        stack = getattr(self, "fused_blocks", True) and not self.grad_checkpointing and all(
            type(blk) is Block and blk.fused_norm and not (blk._forward_hooks or blk._forward_pre_hooks)
            for blk in blocks)
        if not stack:
            for blk in blocks:
                x = self._block(blk, x)
            return norm(x)
        if all(blk.stream_runs(x) for blk in blocks):  # each residual add in a GEMM epilogue
            for blk in blocks:
                x = blk.forward_stream(x)
            return ops.add_norm(x, None, norm, backend=self.backend)[1]  # nothing pending
        pending = None
        for blk in blocks:
            x, pending = blk.forward_pending(x, pending)
        return ops.add_norm(x, pending, norm, backend=self.backend)[1]

    def initialize_weights(self):
        # initialization
        # initialize (and freeze) pos_embed by sin-cos embedding
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.patch_embed.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # initialize patch_embed like nn.Linear (instead of nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=0.02) as cutoff is too big (2.)
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)

        # initialize nn.Linear and nn.LayerNorm
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            # we use xavier_uniform following official JAX ViT:
            torch.nn.init.xavier_uniform_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------------------
    # shapes
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def in_chans(self) -> int:
        return self.patch_embed.in_chans

    def patchify(self, imgs):
        """
        imgs: (N, C, H, W)
        x: (N, L, patch_size**2 *C)
        """
        self._check_imgs(imgs)
        return reference.patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        """
        x: (N, L, patch_size**2 *C)
        imgs: (N, C, H, W)
        """
        p, c = self.patch_size, self.in_chans
        if x.dim() != 3 or x.shape[1] != self.patch_embed.num_patches or x.shape[2] != p * p * c:
            raise ValueError(f"unpatchify expects (N, {self.patch_embed.num_patches}, {p * p * c}), got {tuple(x.shape)}")
        return reference.unpatchify(x, p, self.patch_embed.grid_size, c)

    def random_masking(self, x, mask_ratio, noise=None):
        """
        Perform per-sample random masking by per-sample shuffling.
        Per-sample shuffling is done by argsort random noise.
        x: [N, L, D], sequence
        noise: [N, L] or None (then drawn with torch.rand as the official)
        """
        N, L, D = x.shape  # batch, length, dim
        len_keep = self._len_keep(L, mask_ratio)
        noise = self._noise(noise, N, L, x.device)
        ids_keep, ids_restore, mask = ops.masking_indices(noise, len_keep, backend=self.backend)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        """
        x: imgs (N, C, H, W)
        returns latent (N, 1+len_keep, D), mask (N, L), ids_restore (N, L)
        """
        self._check_imgs(x)
        N, L = x.shape[0], self.patch_embed.num_patches
        len_keep = self._len_keep(L, mask_ratio)
        if noise is not None:
            noise = self._noise(noise, N, L, x.device)  # checked; None: drawn where it is used
        if self._overrides_encoder_input():
            # a subclass's random_masking, or a replaced / hooked patch_embed: the official order
            x = self.patch_embed(self.normalize_input(x))
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise) if noise is not None \
                else self.random_masking(x, mask_ratio)
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        else:
            # masking indices once per step, shared by every op below
            noise = self._noise(noise, N, L, x.device)
            ids_keep, ids_restore, mask = ops.masking_indices(noise, len_keep, backend=self.backend)
            # embed patches, add pos embed, keep the unmasked ones, append cls token
            x = ops.patch_embed_masked(x, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
                                       self.pos_embed, self.cls_token, ids_keep, backend=self.backend,
                                       **self._pixel_args(x))

        # apply Transformer blocks
        x = self._blocks_then_norm(self.blocks, self.norm, x)

        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore, len_decode=None):
        """x: latent (N, 1+K, D); ids_restore (N, L) -> pred (N, L, p*p*C) (official).
        len_decode = M (decoder-side masking): the decoder sees cls + the K visible tokens + M mask
        tokens (``reference.decoder_ids`` order), and pred is (N, K+M, p*p*C) in that order."""
        # embed tokens
        x = self.decoder_embed(x)

        # append mask tokens to sequence, unshuffle, add pos embed
        if len_decode is None:
            x = ops.unshuffle(x, self.mask_token, ids_restore, self.decoder_pos_embed, backend=self.backend)
        else:  # decoder-side masking: only M of the masked patches get a token
            x = ops.unshuffle_subset(x, self.mask_token, ids_restore, len_decode, self.decoder_pos_embed,
                                     backend=self.backend)

        # apply Transformer blocks
        x = self._blocks_then_norm(self.decoder_blocks, self.decoder_norm, x)

        # predictor projection
        x = self.decoder_pred(x)

        # remove cls token
        x = x[:, 1:, :]

        return x

    def forward_loss(self, imgs, pred, mask, ids_decoded=None):
        """
        imgs: [N, C, H, W]
        pred: [N, L, p*p*C]
        mask: [N, L], 0 is keep, 1 is remove,
        ids_decoded (decoder-side masking): [N, M] patch of each row of pred [N, M, p*p*C];
        the loss is then the mean over these N*M patches (mask is not used).
        """
        if ids_decoded is not None:
            if type(self).patchify is not MaskedAutoencoderViT.patchify:  # a subclass's own patchify
                return reference.masked_loss_subset_on_target(self.patchify(self.normalize_input(imgs)), pred,
                                                              ids_decoded, self.norm_pix_loss)
            return ops.masked_loss_rows(imgs, pred, ids_decoded, self.patch_size, self.norm_pix_loss,
                                        backend=self.backend, **self._pixel_args(imgs))
        if type(self).patchify is not MaskedAutoencoderViT.patchify:  # a subclass's own patchify
            return reference.masked_loss_on_target(self.patchify(self.normalize_input(imgs)), pred,
                                                   mask, self.norm_pix_loss)
        return ops.masked_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss, backend=self.backend,
                               **self._pixel_args(imgs))

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> (loss, pred (N, L, p*p*C), mask (N, L), 1 = removed by the encoder), as the official.

        decoder_mask_ratio > 0 (decoder-side masking, VideoMAE V2 / CrossMAE style; not in the
        official code): of the L - K masked patches, in noise order, the first
        M = ``reference.num_decode(L - K, decoder_mask_ratio)`` get a mask token in the decoder
        and the rest are dropped before it (``reference.decoder_ids``: ``noise`` fixes both sets).
        The loss is the mean over the M decoded patches only. pred keeps the official shape:
        rows of visible and decoded patches hold the decoder's prediction, rows of dropped
        patches are 0 (not computed)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if not self.decoder_mask_ratio:  # the official path
            pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
            loss = self.forward_loss(imgs, pred, mask)
            return loss, pred, mask
        N, L = ids_restore.shape
        len_keep = latent.shape[1] - 1
        len_decode = self._len_decode(L - len_keep)
        ids_decode = reference.decoder_ids(ids_restore, len_keep, len_decode)  # (N, K+M)
        pred_rows = self.forward_decoder(latent, ids_restore, len_decode)  # (N, K+M, p*p*C)
        # the loss reads the decoded masked rows in place (a view: no copy)
        loss = self.forward_loss(imgs, pred_rows[:, len_keep:, :], mask, ids_decode[:, len_keep:])
        pred = pred_rows.new_zeros((N, L, pred_rows.shape[2]))
        pred = pred.scatter(1, ids_decode.unsqueeze(-1).expand(-1, -1, pred_rows.shape[2]), pred_rows)
        return loss, pred, mask

    # ------------------------------------------------------------------------------
    # what runs, and input checks (clear errors, never a silent wrong answer)
    def backend_choices(self, device=None):
        """{op: Choice} for tensors on ``device`` (default: where the parameters live)."""
        device = device if device is not None else self.cls_token.device
        glue_ops = ("random_masking", "patch_embed_masked", "unshuffle", "masked_loss")
        choices = {op: choose(op, device, self.backend) for op in glue_ops}
        choices["attention"] = choose("attention", device, self.attn_backend)
        choices["add_layer_norm"] = choose("add_layer_norm", device, self.backend)
        return choices

    def _overrides_encoder_input(self) -> bool:
        """True when a subclass overrides random_masking, or patch_embed is replaced or hooked:
        then the encoder input runs the official op sequence through those, so what a fork
        changed is what runs (the fused path would bypass them)."""
        pe = self.patch_embed
        return (type(self).random_masking is not MaskedAutoencoderViT.random_masking
                or type(pe) is not PatchEmbed or bool(pe._forward_hooks or pe._forward_pre_hooks
                                                       or pe.proj._forward_hooks or pe.proj._forward_pre_hooks))

    def _check_imgs(self, imgs):
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
        if imgs.dtype == torch.uint8:
            self._pixel_args(imgs)  # TypeError without set_input_normalization
        elif not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor (or uint8 with "
                            f"set_input_normalization), got {imgs.dtype}")
        C, H, W = imgs.shape[1:]
        if C != self.in_chans:
            raise ValueError(f"imgs have {C} channels, the model was built with in_chans={self.in_chans}")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        if (H, W) != tuple(self.patch_embed.img_size):
            raise ValueError(f"image size {H}x{W} does not match img_size {tuple(self.patch_embed.img_size)}")
        if imgs.dtype not in (torch.uint8, self.cls_token.dtype) \
                and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(f"imgs dtype {imgs.dtype} does not match the model's {self.cls_token.dtype} "
                            "(cast the model or the images, or use torch.autocast)")
        if imgs.device != self.cls_token.device:
            raise ValueError(f"imgs are on {imgs.device}, the model on {self.cls_token.device}")

    @staticmethod
    def _check_decoder_mask_ratio(decoder_mask_ratio):
        if isinstance(decoder_mask_ratio, bool) or not isinstance(decoder_mask_ratio, (int, float)):
            raise TypeError(f"decoder_mask_ratio must be a float in [0, 1), got {decoder_mask_ratio!r}")
        if not 0.0 <= decoder_mask_ratio < 1.0:
            raise ValueError(f"decoder_mask_ratio must be in [0, 1), got {decoder_mask_ratio}")
        return float(decoder_mask_ratio)

    def _len_decode(self, len_mask):
        """Masked patches the decoder reconstructs (decoder-side masking): at least 1."""
        len_decode = reference.num_decode(len_mask, self.decoder_mask_ratio)
        if len_decode < 1:
            raise ValueError(f"decoder_mask_ratio={self.decoder_mask_ratio} decodes none of the "
                             f"{len_mask} masked patches (lower it, or the encoder's mask_ratio)")
        return len_decode

    @staticmethod
    def _len_keep(L, mask_ratio):
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
            raise TypeError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = reference.num_keep(L, mask_ratio)
        if len_keep < 1:
            raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {L}")
        return len_keep

    @staticmethod
    def _noise(noise, N, L, device):
        if noise is None:
            return torch.rand(N, L, device=device)  # noise in [0, 1]
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be floating point, got {noise.dtype}")
        if noise.device != device:
            raise ValueError(f"noise is on {noise.device}, imgs on {device}")
        return noise


def mae_vit_base_patch16_dec512d8b(**kwargs):
    model = MaskedAutoencoderViT(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


def mae_vit_large_patch16_dec512d8b(**kwargs):
    model = MaskedAutoencoderViT(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    model = MaskedAutoencoderViT(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return model


# set recommended archs
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks
