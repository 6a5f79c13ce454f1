"""Reconstruction pictures: one row per image, three panels side by side:

    masked input | reconstruction with the visible patches pasted back | original

Masked patches show as 0 in the normalised space (the ImageNet mean colour), as in the official
visualisation notebook. With ``norm_pix_loss`` the model predicts each patch normalised by the
patch's own mean and (unbiased) variance; the prediction is mapped back with the *original*
patch's statistics before display, which is the only way to show it in pixel space.

Picture size: ``width = 3 * S * upscale + 4 * pad`` and ``height = N * S * upscale + (N + 1) * pad``
for N images of S x S pixels.
"""
import os

import numpy as np
import torch
from PIL import Image

from .data import denormalize


@torch.no_grad()
def reconstruction_panels(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor = None):
    """imgs (N, 3, H, W) normalised -> (masked, pasted, original), each (N, 3, H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # pred (N, L, p*p*C), mask (N, L)
    finally:
        model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)  # (N, L, p*p*C)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the loss
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)  # (N, C, H, W)
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand_as(pred))  # 1 where removed
    masked = imgs * (1 - removed)
    pasted = imgs * (1 - removed) + recon * removed
    return denormalize(masked), denormalize(pasted), denormalize(imgs)


def panels_to_grid(panels, upscale: int = 3, pad: int = 2) -> np.ndarray:
    """[(N, 3, S, S) in [0, 1], ...] -> uint8 (H, W, 3): row n holds image n's panels."""
    n, _, s_h, s_w = panels[0].shape
    cols = len(panels)
    cell_h, cell_w = s_h * upscale, s_w * upscale
    grid = np.full((n * cell_h + (n + 1) * pad, cols * cell_w + (cols + 1) * pad, 3), 255, np.uint8)
    for c, panel in enumerate(panels):
        arr = (panel.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)  # nearest-neighbour upscale
        for r in range(n):
            top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[top:top + cell_h, left:left + cell_w] = arr[r]
    return grid


def save_reconstructions(model, imgs: torch.Tensor, path: str, mask_ratio: float,
                         noise: torch.Tensor = None, upscale: int = 3, pad: int = 2) -> str:
    """Write the picture to ``path`` (PNG, atomically) and return the path."""
    grid = panels_to_grid(reconstruction_panels(model, imgs, mask_ratio, noise), upscale, pad)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
