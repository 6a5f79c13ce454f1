"""Loading the official tiny-run fixtures (computed by facebookresearch/mae models_mae.py in
float64) into a mae_fast model."""
import os
from functools import partial

import torch
import torch.nn as nn

import mae_fast

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL_RUNS = ["official_mae_tiny_pix.pt", "official_mae_tiny_normpix.pt", "official_mae_tiny_p8_ratio50.pt"]


def load_run(name):
    run = torch.load(os.path.join(FIXTURES, name), weights_only=True)
    config = {k[len("config."):]: v.item() for k, v in run.items() if k.startswith("config.")}
    params = {k[len("param."):]: v for k, v in run.items() if k.startswith("param.")}
    grads = {k[len("grad."):]: v for k, v in run.items() if k.startswith("grad.")}
    return run, config, params, grads


def build_model(config, **kwargs):
    # the official factories use LayerNorm(eps=1e-6); so did the run that made the fixtures
    return mae_fast.MaskedAutoencoderViT(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        decoder_embed_dim=config["decoder_embed_dim"], decoder_depth=config["decoder_depth"],
        decoder_num_heads=config["decoder_num_heads"], mlp_ratio=config["mlp_ratio"],
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=bool(config["norm_pix_loss"]), **kwargs)
