"""The official MAE optimisation recipe: parameter groups with/without weight decay, and the
per-iteration learning rate (linear warmup, then half-cycle cosine) of ``util/lr_sched.py``."""
import math
from typing import Iterable, List

import torch

# Tokens and positional tables are not decayed (the positional tables are frozen anyway).
# Official MAE pretraining calls timm's add_weight_decay with an empty skip list, so there the
# (1, 1, D) cls/mask tokens *are* decayed; finetuning skips them (models_vit.no_weight_decay).
# The issue asks for no decay on tokens: that is what this list does.
NO_WEIGHT_DECAY = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "dist_token")


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              skip_list: Iterable[str] = NO_WEIGHT_DECAY) -> List[dict]:
    """Two AdamW groups: no decay for 1-D parameters (norms, biases), ``*.bias`` and names in
    ``skip_list``; ``weight_decay`` for the rest. Frozen parameters are left out."""
    skip = set(skip_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional ``epoch`` (= epoch + iteration / iterations_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float,
                         warmup_epochs: float, epochs: float) -> float:
    """Set every group's lr (times its ``lr_scale`` if any) for fractional ``epoch``; return lr."""
    value = learning_rate(epoch, lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value
