"""ViT building blocks with timm's module and parameter names (so official MAE checkpoints load
unchanged) and no timm dependency. Attention goes through ``mae_fast.attention.attend``.

What a ``Block`` runs (same math each way; ``model.set_fused_blocks(False)`` gives the plain one):
  plain:   ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``;
  pending: (fused blocks, the default) each residual add with the LayerNorm after it,
           ``mae_fast::add_layer_norm`` (``forward_pending``; the model stacks the blocks so that
           a block's last add runs with the next block's norm1 or the final norm);
  stream:  (fused blocks with ``MAE_FAST_MLP=gemm`` where the MLP runs the Triton GEMMs,
           ``stream_runs``) each residual add in the epilogue of the GEMM that makes the branch:
           ``y1, s = norm1(s); s = s + proj(attention(y1)); y2, s = norm2(s); s = s + mlp(y2)``
           with the adds inside ``mae_fast::linear_residual`` (proj) and ``mae_fast::mlp_fc2``
           (fc2), and the LayerNorms ``mae_fast.ops.layernorm.norm_stream`` (no add: they read
           the stream once and write y; their backward takes the stream's gradient from the
           residual add in the same kernel). Saved for backward: what the plain block saves
           (each LayerNorm's input s, weight, fp32 mean / rstd; each Linear's input and weight;
           the residual adds save nothing)."""
import torch
import torch.nn as nn

from .attention import attend, qkv_attention
from .ops.layernorm import add_norm, norm_stream
from .ops import mlp as mlp_ops


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class PatchEmbed(nn.Module):
    """Image to patch embedding: (N, C, H, W) -> (N, L, D), L = (H/p) * (W/p)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"MAE needs square patches, got {patch_size}")
        for side, p in zip(img_size, patch_size):
            if side % p != 0:
                raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size[0]}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_drop != 0.0:
            raise ValueError("MAE uses no attention dropout; attn_drop must be 0")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = "auto"  # attention backend; the model sets it (see mae_fast.attention)
        # True: the qkv projection's backward takes dq, dk, dv from the attention's backward
        # without merging them into d(qkv) (mae_fast.attention.qkv_attention); False: plain
        self.fused_qkv = True
        # mae_fast.backends backend of the fused backward's weight-gradient GEMM (MAE_FAST_MLP=gemm)
        self.gemm_backend = "auto"

    def forward(self, x, return_attn: bool = False):
        if return_attn:
            x, attn = attend(self.qkv(x), self.num_heads, self.scale, backend=self.backend, return_attn=True)
        else:
            x, attn = qkv_attention(x, self.qkv, self.num_heads, self.scale, backend=self.backend,
                                    fused=self.fused_qkv, gemm_backend=self.gemm_backend), None  # (B, M, C)
        x = self.proj_drop(self.proj(x))  # (B, M, C)
        return (x, attn) if return_attn else x


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's names). With ``MAE_FAST_MLP=gemm`` (opt-in) and a fused
    ``backend``, the Triton GEMMs of ``mae_fast.ops.mlp`` run it: GELU in fc1's epilogue, GELU'
    in fc2's grad-input GEMM, bias grads in the weight-grad GEMMs; same math."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.backend = "auto"  # the model sets it (mae_fast.backends: "reference" = the plain ops)

    def forward(self, x):
        if mlp_ops.fused_mlp_runs(self, x, self.backend):
            return mlp_ops.fused_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        # True: each residual add runs with the LayerNorm after it as one op
        # (mae_fast.ops.add_layer_norm); False: the plain ops. The model sets both.
        self.fused_norm = True
        self.backend = "auto"  # mae_fast.backends backend of add_layer_norm

    def forward(self, x):
        if self.stream_runs(x):
            return self.forward_stream(x)
        if not self.fused_norm:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x
        x, branch = self.forward_pending(x)
        return x + branch

    def forward_pending(self, x, pending=None):
        """The block with its last residual add left to the caller, so that it can run with the
        next LayerNorm: the block's input is ``x + pending`` (``x`` when pending is None);
        returns ``(h, mlp_branch)`` where the block's output is ``h + mlp_branch``."""
        x, y = add_norm(x, pending, self.norm1, fused=self.fused_norm, backend=self.backend)
        x, y = add_norm(x, self.attn(y), self.norm2, fused=self.fused_norm, backend=self.backend)
        return x, self.mlp(y)

    def stream_runs(self, x) -> bool:
        """Whether the block runs ``forward_stream`` on x: fused blocks, the MLP on the Triton
        GEMMs (``mlp_ops.fused_mlp_runs``: MAE_FAST_MLP=gemm), the attention module and its proj
        the plain structure (no hooks, no active proj dropout), not under torch.compile."""
        attn = self.attn
        return bool(self.fused_norm and not torch.compiler.is_compiling()
                    and type(attn) is Attention and not (attn._forward_hooks or attn._forward_pre_hooks)
                    and mlp_ops._is_plain_linear(attn.proj)
                    and (attn.proj_drop.p == 0.0 or not attn.proj_drop.training)
                    # the proj's parameters in the MLP's dtype (mixed ones: the plain path's error)
                    and {p.dtype for p in attn.proj.parameters()} == {self.mlp.fc2.weight.dtype}
                    and mlp_ops.fused_mlp_runs(self.mlp, x, self.mlp.backend))

    def forward_stream(self, s):
        """The block with each residual add in a GEMM epilogue (see the module docstring): s
        (B, M, C) -> the block's output (B, M, C)."""
        y, s = norm_stream(s, self.norm1, backend=self.backend)
        attn = self.attn
        o = qkv_attention(y, attn.qkv, attn.num_heads, attn.scale, backend=attn.backend,
                          fused=attn.fused_qkv, gemm_backend=attn.gemm_backend)  # (B, M, C)
        s = mlp_ops.linear_add(o, attn.proj.weight, attn.proj.bias, s)  # s + proj(o)
        y, s = norm_stream(s, self.norm2, backend=self.backend)
        mlp = self.mlp
        return mlp_ops.fused_mlp(y, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                 residual=s)  # s + mlp(y)
