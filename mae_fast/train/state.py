"""Checkpoints and resume: the one part of the trainer that writes and reads training state.

Format: the official ``{"model", "optimizer", "epoch", "scaler", "args"}`` (``epoch`` = last
completed epoch, ``args`` a plain dict, ``scaler`` a GradScaler state the official loader accepts)
plus mae_fast's extras for an exact mid-epoch resume: ``step_in_epoch``, ``global_step``, the RNG
states and the version. Reading and writing go through ``mae_fast.checkpoint``: weights-only
loads (an official ``checkpoint-N.pth`` with its ``argparse.Namespace`` args included), the
optimizer state mapped across the weight-decay recipes, atomic writes. ``--save-format
safetensors`` also writes the weights of every kept checkpoint as ``checkpoint-<epoch>.safetensors``
(architecture in the metadata); the training checkpoints that resume stay ``.pth``.
"""
import os

import torch

from .. import checkpoint
from ..checkpoint import save_checkpoint
from ..recipes import UsageError
from .seeds import rng_state, set_rng_state

LAST = "checkpoint-last.pth"
SAVE_FORMATS = ("pth", "safetensors")
# args that change the trajectory: a resume with other values is allowed, with a note
TRAJECTORY_ARGS = ("batch_size", "accum_iter", "world_size", "epochs", "blr", "lr", "seed",
                   "mask_ratio", "norm_pix_loss", "data_path", "builtin_size", "weight_decay_recipe")


def _scaler_state(scaler) -> dict:
    if scaler.is_enabled():
        return scaler.state_dict()
    # the official code always has an enabled scaler: store a fresh one so its loader accepts ours
    return torch.amp.GradScaler("cpu", enabled=True).state_dict()


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def checkpoint_dict(model, optimizer, scaler, args, epoch_done: int, step_in_epoch: int, global_step: int):
    from .. import __version__
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch_done,  # last completed epoch (official meaning); -1: none yet
        "scaler": _scaler_state(scaler),
        "args": {k: _plain(v) for k, v in vars(args).items()},
        # mae_fast extras for an exact mid-epoch resume
        "step_in_epoch": step_in_epoch,  # iterations already done in epoch `epoch + 1`
        "global_step": global_step,
        "rng": rng_state(),
        "mae_fast_version": __version__,
    }


def read_resume(path: str) -> dict:
    """``checkpoint.load_training_checkpoint(path)`` (official or mae_fast), UsageError when it is not one."""
    try:
        return checkpoint.load_training_checkpoint(path)
    except FileNotFoundError as e:
        raise UsageError(f"--resume {path!r} does not exist") from e
    except ValueError as e:
        raise UsageError(f"--resume: {e}") from e


def resume_path(resume, output_dir):
    """--resume PATH, or 'auto': OUTPUT_DIR/checkpoint-last.pth when it exists; None: a fresh run."""
    if resume == "auto":
        path = os.path.join(output_dir, LAST)
        return path if os.path.exists(path) else None
    return resume or None


def _derived_lr(saved: dict) -> bool:
    """Was the official run's ``lr`` computed as ``blr * eff_batch / 256`` (not given by its user)?"""
    try:
        eff = saved["batch_size"] * saved.get("accum_iter", 1) * saved.get("world_size", 1)
        return saved.get("lr") is None or abs(saved["lr"] - saved["blr"] * eff / 256) <= 1e-9 * abs(saved["lr"])
    except (KeyError, TypeError):
        return False


def schedule_from_official(ckpt: dict, args, given) -> list:
    """Fill the recipe values of ``args`` the user did not give (``given``: option dests named on
    the command line) from an official checkpoint's args, as ``main_pretrain.py`` would continue
    the run. ``lr`` is taken only when the official run set it (not derived from ``blr``); a
    given --lr or --blr keeps both. Returns the ``key=value`` strings taken."""
    saved = checkpoint.schedule_from_args(ckpt["args"])
    skip = set(given)
    if "lr" in given or "blr" in given:
        skip |= {"lr", "blr"}
    elif _derived_lr(ckpt["args"]):
        skip.add("lr")  # recomputed from blr and this run's effective batch, as the official does
    taken = []
    for key, value in saved.items():
        if key in skip or value is None or not hasattr(args, key):
            continue
        setattr(args, key, value)
        taken.append(f"{key}={value!r}")
    return taken


def resume_training(ckpt: dict, path: str, args, model, optimizer, scaler, steps_per_epoch: int, say):
    """Load a checkpoint ``read_resume`` read into model/optimizer/scaler (and, for mae_fast's own
    checkpoints, the RNGs in a 1-process run); return (start_epoch, start_step)."""
    saved = ckpt["args"]
    for key in ("model", "input_size"):
        if key in saved and saved[key] != getattr(args, key):
            raise UsageError(f"--resume {path}: the checkpoint has {key}={saved[key]!r}, "
                             f"this run {key}={getattr(args, key)!r}")
    differ = [k for k in TRAJECTORY_ARGS if k in saved and saved[k] != getattr(args, k)]
    if differ:
        say(f"note: resuming with different {', '.join(differ)} than the checkpoint: "
            "the loss trajectory will differ from an uninterrupted run")
    # the run's options set the group hyperparameters (--weight-decay; lr is set every iteration,
    # a tensor under CUDA graphs); the file gives the state: Adam moments and step counts
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        report = checkpoint.resume_training(ckpt, model, optimizer, scaler)
    except ValueError as e:
        raise UsageError(f"--resume {path}: {e}") from e
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    for note in report.notes:
        say(f"note: {note}")
    start_epoch, start_step = report.start_epoch, report.start_step
    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    if "rng" in ckpt and args.world_size == 1:
        set_rng_state(ckpt["rng"])
    say(f"resumed from {path} ({report.format} checkpoint): epoch {start_epoch}, "
        f"iteration {start_step} of {steps_per_epoch}")
    return start_epoch, start_step


def check_save_format(args) -> None:
    """UsageError before training when --save-format safetensors cannot be written here."""
    if getattr(args, "save_format", "pth") == "safetensors":
        try:
            checkpoint.optional_import("safetensors.torch", "safetensors", "--save-format safetensors")
        except ImportError as e:
            raise UsageError(str(e)) from e


def save_weights(path: str, model, args, epoch_done: int) -> None:
    """The weights as ``.safetensors``, the architecture (``convert.architecture``) plus the model
    name, input size, mask ratio and epoch in the metadata: ``mae-fast convert``, ``load_mae`` and
    ``mae-fast linprobe`` rebuild the model from it."""
    from ..convert import architecture
    meta = dict(architecture(model), model=args.model, input_size=args.input_size, mask_ratio=args.mask_ratio,
                epoch=epoch_done)
    checkpoint.save_state_dict(path, model.state_dict(), metadata=meta)


class Checkpointer:
    """Writes checkpoint-last.pth (end of every epoch, and every --save-every-steps iterations)
    and checkpoint-<epoch>.pth (every --save-freq epochs and at the end). Rank 0 only."""

    def __init__(self, args, model, optimizer, scaler, steps_per_epoch: int, enabled: bool):
        self.args, self.model, self.optimizer, self.scaler = args, model, optimizer, scaler
        self.steps_per_epoch = steps_per_epoch
        self.enabled = enabled
        self.last_path = os.path.join(args.output_dir, LAST)
        self.last_saved = "none written by this run"

    def _dict(self, epoch_done, step_in_epoch):
        global_step = (epoch_done + 1) * self.steps_per_epoch + step_in_epoch
        return checkpoint_dict(self.model, self.optimizer, self.scaler, self.args, epoch_done,
                               step_in_epoch, global_step)

    def due_mid_epoch(self, it: int) -> bool:
        """True after iteration ``it`` (0-based) when --save-every-steps asks for a checkpoint."""
        k = self.args.save_every_steps
        return bool(k) and (it + 1) % k == 0 and it + 1 < self.steps_per_epoch

    def save_mid_epoch(self, epoch: int, steps_done: int) -> None:
        if self.enabled:
            save_checkpoint(self.last_path, self._dict(epoch - 1, steps_done))
            self.last_saved = f"{self.last_path} (epoch {epoch + 1}, after iteration {steps_done})"

    def save_epoch_end(self, epoch: int) -> None:
        if not self.enabled:
            return
        ckpt = self._dict(epoch, 0)
        save_checkpoint(self.last_path, ckpt)
        self.last_saved = f"{self.last_path} (end of epoch {epoch + 1})"
        if (epoch + 1) % self.args.save_freq == 0 or epoch + 1 == self.args.epochs:
            save_checkpoint(os.path.join(self.args.output_dir, f"checkpoint-{epoch}.pth"), ckpt)
            if getattr(self.args, "save_format", "pth") == "safetensors":
                save_weights(os.path.join(self.args.output_dir, f"checkpoint-{epoch}.safetensors"),
                             self.model, self.args, epoch)
