"""Fixed 2-D sin-cos positional tables, as the official ``util/pos_embed.py`` computes them
(numpy, float64, then stored in the parameter's dtype), generalised to non-square grids, and
the official bicubic interpolation used when a checkpoint was trained at another size."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions to encode, any shape (M,) -> (M, D)"""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos positional embedding needs an even dim, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> np.ndarray:
    """grid_size: int or (h, w) patches -> (h*w, D) or (1+h*w, D) with a zero cls row.

    For a square grid this equals the official table bit for bit. As the official, the first
    half of the channels encodes the column (w) index and the second half the row (h) index.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positional embedding needs embed_dim % 4 == 0, got {embed_dim}")
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first, each (gh, gw)
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid, num_extra_tokens: int = 1,
                          old_grid=None) -> torch.Tensor:
    """Resize a (1, extra + h*w, D) table to ``new_grid`` (h', w') the official way: keep the
    extra (cls) rows, bicubic-interpolate the patch rows. ``old_grid`` defaults to square."""
    D = pos_embed.shape[-1]
    n_old = pos_embed.shape[-2] - num_extra_tokens
    if old_grid is None:
        side = int(math.isqrt(n_old))
        if side * side != n_old:
            raise ValueError(
                f"checkpoint positional table has {n_old} patch rows, not a square grid; "
                "pass old_grid=(h, w)")
        old_grid = (side, side)
    new_grid = tuple(new_grid)
    if tuple(old_grid) == new_grid:
        return pos_embed
    extra = pos_embed[:, :num_extra_tokens]
    tokens = pos_embed[:, num_extra_tokens:].reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens.float(), size=new_grid, mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, tokens), dim=1)
