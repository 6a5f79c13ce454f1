"""One training iteration: forward under autocast, backward, and every --accum-iter iterations the
optimizer update (clip, GradScaler for fp16), as the official ``engine_pretrain.py``."""
import contextlib
import math

import torch
import torch.nn as nn

from .. import lr_sched


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is not finite): reported as one line, exit status 1."""


def build_optimizer(model, args):
    """AdamW(betas=(0.9, 0.95)) on the official weight-decay groups."""
    return torch.optim.AdamW(lr_sched.param_groups_weight_decay(model, args.weight_decay),
                             lr=args.lr, betas=(0.9, 0.95))


class TrainStep:
    """``step(imgs, noise, it, where)``: one iteration; returns the loss as a float."""

    def __init__(self, model, optimizer, scaler, amp_dtype, device, args, distributed: bool):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.amp_dtype, self.device = amp_dtype, device
        self.accum_iter, self.clip_grad, self.mask_ratio = args.accum_iter, args.clip_grad, args.mask_ratio
        self.distributed = distributed

    def __call__(self, imgs, noise, it: int, where: str) -> float:
        update = (it + 1) % self.accum_iter == 0
        sync = contextlib.nullcontext() if update or not self.distributed else self.model.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, _, _ = self.model(imgs, mask_ratio=self.mask_ratio, noise=noise)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss is {loss_value} at {where}; stopping")
            self.scaler.scale(loss / self.accum_iter).backward()
        if update:
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_value
