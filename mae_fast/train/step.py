"""One training iteration, without a host read.

``TrainStep(imgs, noise, it, step)``: forward under autocast, backward, and every --accum-iter
iterations the optimizer update (clip, GradScaler for fp16), as the official ``engine_pretrain.py``.
Nothing here reads a device value on the host, so on a GPU the CPU runs ahead of the kernels:

* the losses are summed on the device (``window_*`` between log rows, ``epoch_*`` per epoch); the
  loop reads them every --log-every iterations (``read_window``);
* a non-finite step is found on the device (a 0/1 float ``found_inf``, as ``GradScaler`` keeps):
  a non-finite loss in any micro-batch of the update, or a non-finite gradient norm. The update is
  then a no-op without a host read: the fused AdamW kernel takes ``found_inf`` and returns early
  (parameters, moments and step count unchanged); the for-each AdamW fallback is undone with
  ``torch.where`` on a copy. ``NonFiniteSteps`` counts bad updates and the longest streak on the
  device; the loop stops the run when the streak reaches --max-bad-steps (``check_bad_steps``).
* with fp16 the GradScaler skips updates whose scaled gradients overflow (part of loss scaling,
  not counted); a non-finite loss is counted as above.
"""
import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import lr_sched


# the loss terms a model may return besides the total (mae_fast.ContrastiveMAE's ContrastiveOutput
# fields): summed on the device like the loss, logged as log.csv columns of these names
LOSS_PARTS = ("loss_rec", "loss_con")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps): reported as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------
# the optimizer
def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for float32 parameters on ``device`` (asks torch)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizer(model, args, device: torch.device, capturable: bool = False):
    """AdamW(betas=(0.9, 0.95)) on the weight-decay groups of --weight-decay-recipe (default: the
    official ones); fused where supported
    (--fused-adamw auto), else for-each. ``capturable``: state and lr on the device, for CUDA graphs."""
    want = getattr(args, "fused_adamw", None)
    supported = fused_adamw_supported(device)
    if want and not supported:
        raise ValueError(f"--fused-adamw: this torch has no fused AdamW on {device.type}")
    fused = supported if want is None else bool(want)
    recipe = getattr(args, "weight_decay_recipe", lr_sched.DEFAULT_WEIGHT_DECAY_RECIPE)
    groups = lr_sched.param_groups_weight_decay(model, args.weight_decay, lr_sched.skip_list_for(recipe))
    if capturable:  # one lr tensor per group (a shared one would take the last group's lr_scale)
        groups = [dict(g, lr=torch.tensor(float(args.lr), device=device)) for g in groups]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused, capturable=capturable,
                             foreach=None if fused else True)


def set_learning_rate(optimizer, fractional_epoch: float, args) -> float:
    """The official per-iteration lr (warmup + cosine); a tensor lr (capturable) is filled in place
    so a captured graph sees the schedule."""
    if not isinstance(optimizer.param_groups[0]["lr"], torch.Tensor):
        return lr_sched.adjust_learning_rate(optimizer, fractional_epoch, args.lr, args.min_lr,
                                             args.warmup_epochs, args.epochs)
    value = lr_sched.learning_rate(fractional_epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"].fill_(value * group.get("lr_scale", 1.0))
    return value


# ---------------------------------------------------------------------------------------------
class NonFiniteSteps:
    """Device counters of skipped updates: total, current streak, longest streak, and the global
    iteration where the longest streak began."""

    def __init__(self, device):
        self.total = torch.zeros((), device=device)
        self.streak = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)
        self.longest_start = torch.full((), -1.0, device=device)
        self._streak_start = torch.full((), -1.0, device=device)

    def record(self, bad: torch.Tensor, step: int) -> None:
        """``bad``: 0/1 float on the device for the update that ended at global iteration ``step``."""
        self.total += bad
        self.streak = (self.streak + 1) * bad
        self._streak_start = torch.where(self.streak == 1, float(step), self._streak_start)
        longer = self.streak > self.longest
        self.longest_start = torch.where(longer, self._streak_start, self.longest_start)
        self.longest = torch.maximum(self.longest, self.streak)


class TrainStep:
    """``step(imgs, noise, it, step)``: one iteration (``it`` in the epoch, ``step`` global)."""

    def __init__(self, model, optimizer, scaler, amp_dtype, device, args, distributed: bool, forward=None,
                 report_first=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.report_first = report_first  # called once with the first iteration's seconds (--compile)
        self.forward = forward if forward is not None else model  # e.g. the compiled model
        self.amp_dtype, self.device = amp_dtype, device
        self.accum_iter, self.clip_grad, self.mask_ratio = args.accum_iter, args.clip_grad, args.mask_ratio
        self.distributed = distributed
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.fused = bool(optimizer.defaults.get("fused"))
        zero = partial_zero(device)
        self.update_bad = zero()  # 1 once a micro-batch of the current update had a non-finite loss
        self.window_sum, self.window_n = zero(), zero()
        self.epoch_sum, self.epoch_n = zero(), zero()
        self.window_part_sums = {}  # LOSS_PARTS the model returns: sums since the last log row
        self.window_parts = {}  # their means at the last read_window
        self.bad = NonFiniteSteps(device)

    def __call__(self, imgs, noise, it: int, step: int) -> None:
        if self.report_first is not None:  # one timed (synchronised) iteration, e.g. to report compile time
            report, self.report_first = self.report_first, None
            t = time.perf_counter()
            self(imgs, noise, it, step)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            report(time.perf_counter() - t)
            return
        update = (it + 1) % self.accum_iter == 0
        sync = contextlib.nullcontext() if update or not self.distributed else self.model.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.forward(imgs, mask_ratio=self.mask_ratio, noise=noise)
            loss = out[0]
            self._count(loss.detach().float())
            self._count_parts(out, loss)
            self.scaler.scale(loss / self.accum_iter).backward()
        if update:
            self._update(step)

    def _count(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, 0.0)
        self.window_sum += value
        self.window_n += finite
        self.epoch_sum += value
        self.epoch_n += finite
        self.update_bad = torch.maximum(self.update_bad, (~finite).float())

    def _count_parts(self, out, loss) -> None:
        """Sum the loss terms ``out`` names (LOSS_PARTS), over the iterations whose loss is finite."""
        finite = torch.isfinite(loss.detach())
        for name in LOSS_PARTS:
            part = getattr(out, name, None)
            if part is not None:
                value = torch.where(finite, part.detach().float(), 0.0)
                total = self.window_part_sums.get(name)
                self.window_part_sums[name] = value if total is None else total + value

    def _update(self, step: int) -> None:
        found_inf = self.update_bad
        if self.scaler.is_enabled():  # fp16: the scaler finds and skips overflowing updates itself
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
            if self.distributed:
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            total_norm = nn.utils.get_total_norm(grads, foreach=True)  # one read of the grads, on device
            found_inf = torch.maximum(found_inf, (~torch.isfinite(total_norm)).float())
            if self.distributed:  # every rank skips the same updates
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            if self.clip_grad is not None:
                nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, total_norm, foreach=True)
            if self.fused:
                self.optimizer.found_inf = found_inf  # the fused kernel returns early when it is 1
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.found_inf
            else:
                self._step_undone_if(found_inf)
        self.bad.record(found_inf, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.update_bad = torch.zeros_like(self.update_bad)

    def _step_undone_if(self, found_inf: torch.Tensor) -> None:
        """For-each AdamW, then parameters and state put back where ``found_inf`` is 1 (no host read).
        A state AdamW has not created yet is put back to what it creates: zeros."""
        tensors = list(self.params)
        for p in self.params:
            tensors += [v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        saved = {id(t): t.detach().clone() for t in tensors}
        self.optimizer.step()
        bad = found_inf.bool()
        for p in self.params:
            for t in [p] + [v for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor)]:
                before = saved.get(id(t))
                before = torch.zeros_like(t) if before is None else before
                t.detach().copy_(torch.where(bad.to(t.device), before, t.detach()))

    def read_window(self):
        """(mean loss over finite iterations since the last call, over all ranks) -> float; resets."""
        names = [k for k in LOSS_PARTS if k in self.window_part_sums]
        sums = torch.stack([self.window_sum, self.window_n] + [self.window_part_sums[k] for k in names])
        if self.distributed:
            dist.all_reduce(sums)
        self.window_sum.zero_()
        self.window_n.zero_()
        s, n, *parts = sums.tolist()
        self.window_parts = {k: (v / n if n else float("nan")) for k, v in zip(names, parts)}
        for k in names:
            self.window_part_sums[k] = torch.zeros_like(self.window_part_sums[k])
        return s / n if n else float("nan")

    def read_epoch(self):
        """(mean loss of the epoch's finite iterations over all ranks, their count on this rank); resets."""
        sums = torch.stack([self.epoch_sum, self.epoch_n])
        n_local = int(self.epoch_n.item())
        if self.distributed:
            dist.all_reduce(sums)
        self.epoch_sum.zero_()
        self.epoch_n.zero_()
        s, n = sums.tolist()
        return (s / n if n else float("nan")), n_local

    def bad_steps(self):
        """(total skipped updates, longest streak, global iteration where it began): one host read."""
        total, longest, start = torch.stack([self.bad.total, self.bad.longest, self.bad.longest_start]).tolist()
        return int(total), int(longest), int(start)


def partial_zero(device):
    return lambda: torch.zeros((), dtype=torch.float32, device=device)
