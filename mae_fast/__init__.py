"""mae_fast: a GPU-kernel-optimized, drop-in Masked Autoencoder (facebookresearch/mae)."""
__version__ = "0.1.0"

from . import checkpoint, convert, reference
from .backends import choose
from .checkpoint import load_official_checkpoint, load_training_checkpoint, resume_training
from .contrastive import ContrastiveMAE
from .model import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)

__all__ = [
    "MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b",
    "load_official_checkpoint", "load_training_checkpoint", "resume_training", "checkpoint", "convert",
    "reference", "choose", "ContrastiveMAE",
]
