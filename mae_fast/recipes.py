"""The models ``mae-fast pretrain`` / ``linprobe`` know by name, and their default recipes.

Shared by the trainer and the probe (both import it; it imports neither), so that
``pretrain -> linprobe -> recipes`` stays one-way.
"""
from functools import partial

import torch.nn as nn

from .model import (MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14,
                    mae_vit_large_patch16)


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2."""


def mae_vit_tiny_patch8(**kwargs):
    """A 0.4M-parameter MAE for the CPU demo: 64 px images -> 8 x 8 patches of 8 px."""
    return MaskedAutoencoderViT(
        patch_size=8, embed_dim=96, depth=3, num_heads=4,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_tiny_patch4(**kwargs):
    """A smaller one on 4 px patches (e.g. 32 px images -> 8 x 8 patches), for fast tests."""
    return MaskedAutoencoderViT(
        patch_size=4, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


OFFICIAL_RECIPE = dict(input_size=224, blr=1.5e-4, epochs=400, warmup_epochs=40, batch_size=64)
# cpu_threads=1: the demo's matrices (64 x 17 x 96) are too small for a second thread to pay, and on
# a CPU that is busy with anything else OpenMP threads spin against each other (measured on the
# shared 2-core container: ~25 img/s with 2 threads against ~340 with 1). --num-threads overrides.
# knn_every=5: the kNN monitor (one encoder pass over 1797 digits at full length, ~16% of a demo
# epoch measured) after epochs 5 and 10: ~3% of the demo
DEMO_RECIPE = dict(input_size=64, blr=1e-2, epochs=10, warmup_epochs=1, batch_size=64, cpu_threads=1, knn_every=5)

# name -> (factory, defaults that depend on the model)
MODELS = {
    "mae_vit_tiny_patch8": (mae_vit_tiny_patch8, DEMO_RECIPE),
    "mae_vit_tiny_patch4": (mae_vit_tiny_patch4, dict(DEMO_RECIPE, input_size=32, knn_every=0)),
    "mae_vit_base_patch16": (mae_vit_base_patch16, OFFICIAL_RECIPE),
    "mae_vit_large_patch16": (mae_vit_large_patch16, OFFICIAL_RECIPE),
    "mae_vit_huge_patch14": (mae_vit_huge_patch14, OFFICIAL_RECIPE),
}
for _name in ("base_patch16", "large_patch16", "huge_patch14"):
    MODELS[f"mae_vit_{_name}_dec512d8b"] = MODELS[f"mae_vit_{_name}"]
DEFAULT_MODEL = "mae_vit_tiny_patch8"


def build_model(model: str, input_size: int, norm_pix_loss: bool = False, backend: str = "auto"):
    if model not in MODELS:
        raise UsageError(f"unknown --model {model!r}; choose from {', '.join(MODELS)}")
    factory = MODELS[model][0]
    try:
        return factory(img_size=input_size, norm_pix_loss=norm_pix_loss, backend=backend)
    except ValueError as e:  # e.g. input size not a multiple of the patch size
        raise UsageError(f"--model {model} --input-size {input_size}: {e}") from e


def default_cpu_threads(model: str):
    """Torch CPU threads a model trains with on CPU unless --num-threads says (None: torch's choice)."""
    return MODELS[model][1].get("cpu_threads") if model in MODELS else None
