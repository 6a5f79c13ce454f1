"""The official MAE optimisation recipe: parameter groups with/without weight decay, and the
per-iteration learning rate (linear warmup, then half-cycle cosine) of ``util/lr_sched.py``."""
import math
from typing import Iterable, List, Tuple

import torch

# Which parameters get no weight decay, besides every 1-D parameter (norms, biases) and ``*.bias``.
# "official": what facebookresearch/mae main_pretrain.py does -- timm's add_weight_decay(model,
#   weight_decay) with an empty skip list, so the (1, 1, D) cls/mask tokens *are* decayed. The
#   default: an official run and a mae_fast run have the same two param groups, so either resumes
#   the other's optimizer state.
# "no-decay-tokens": mae_fast's earlier choice (as official finetuning's models_vit.no_weight_decay)
#   -- tokens and positional tables are not decayed (the positional tables are frozen anyway).
NO_WEIGHT_DECAY = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "dist_token")
WEIGHT_DECAY_RECIPES = {"official": (), "no-decay-tokens": NO_WEIGHT_DECAY}
DEFAULT_WEIGHT_DECAY_RECIPE = "official"


def skip_list_for(recipe: str) -> tuple:
    """The no-decay name list of a recipe in ``WEIGHT_DECAY_RECIPES`` (ValueError for others)."""
    if recipe not in WEIGHT_DECAY_RECIPES:
        raise ValueError(f"unknown weight-decay recipe {recipe!r}; choose from {', '.join(WEIGHT_DECAY_RECIPES)}")
    return WEIGHT_DECAY_RECIPES[recipe]


def param_group_names(model: torch.nn.Module, skip_list: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """(no-decay names, decay names) in ``named_parameters`` order, frozen parameters left out:
    the rule of timm's ``add_weight_decay`` / ``param_groups_weight_decay``."""
    skip = set(skip_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(name)
        else:
            decay.append(name)
    return no_decay, decay


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              skip_list: Iterable[str] = WEIGHT_DECAY_RECIPES[DEFAULT_WEIGHT_DECAY_RECIPE]
                              ) -> List[dict]:
    """Two AdamW groups, in this order (as the official): no decay for 1-D parameters (norms,
    biases), ``*.bias`` and names in ``skip_list``; ``weight_decay`` for the rest. Frozen
    parameters are left out. The default ``skip_list`` is the official recipe's (empty);
    ``skip_list_for("no-decay-tokens")`` exempts cls/mask tokens too."""
    no_decay, decay = param_group_names(model, skip_list)
    return [{"params": [model.get_parameter(n) for n in no_decay], "weight_decay": 0.0},
            {"params": [model.get_parameter(n) for n in decay], "weight_decay": weight_decay}]


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
