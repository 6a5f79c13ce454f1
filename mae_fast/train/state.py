"""Checkpoints and resume: the one part of the trainer that writes and reads training state.

Format: the official ``{"model", "optimizer", "epoch", "scaler", "args"}`` (``epoch`` = last
completed epoch, ``args`` a plain dict, ``scaler`` a GradScaler state the official loader accepts)
plus mae_fast's extras for an exact mid-epoch resume: ``step_in_epoch``, ``global_step``, the RNG
states and the version. Everything loads with ``torch.load(..., weights_only=True)``; the weights
go through ``mae_fast.checkpoint`` (``read_state_dict``). Writes are atomic.
"""
import os

import torch

from ..checkpoint import read_state_dict
from ..recipes import UsageError
from .seeds import rng_state, set_rng_state

LAST = "checkpoint-last.pth"
# args that change the trajectory: a resume with other values is allowed, with a note
TRAJECTORY_ARGS = ("batch_size", "accum_iter", "world_size", "epochs", "blr", "lr", "seed",
                   "mask_ratio", "norm_pix_loss", "data_path", "builtin_size")


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (atomic)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def load_resume(path: str):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UsageError(f"--resume {path!r} does not exist") from e
    except Exception as e:
        raise UsageError(f"--resume {path!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    for key in ("model", "optimizer", "epoch"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise UsageError(f"--resume {path!r} has no {key!r} entry: not a training checkpoint")
    return ckpt


def resume_path(resume, output_dir):
    """--resume PATH, or 'auto': OUTPUT_DIR/checkpoint-last.pth when it exists; None: a fresh run."""
    if resume == "auto":
        path = os.path.join(output_dir, LAST)
        return path if os.path.exists(path) else None
    return resume or None


def resume_training(path, args, model, optimizer, scaler, steps_per_epoch: int, say):
    """Load ``path`` into model/optimizer/scaler (and the RNGs in a 1-process run);
    return (start_epoch, start_step)."""
    ckpt = load_resume(path)
    saved = ckpt.get("args", {})
    for key in ("model", "input_size"):
        if key in saved and saved[key] != getattr(args, key):
            raise UsageError(f"--resume {path}: the checkpoint has {key}={saved[key]!r}, "
                             f"this run {key}={getattr(args, key)!r}")
    differ = [k for k in TRAJECTORY_ARGS if k in saved and saved[k] != getattr(args, k)]
    if differ:
        say(f"note: resuming with different {', '.join(differ)} than the checkpoint: "
            "the loss trajectory will differ from an uninterrupted run")
    try:
        model.load_state_dict(read_state_dict(ckpt))
    except (TypeError, RuntimeError) as e:
        raise UsageError(f"--resume {path}: the weights do not fit this model ({e})") from e
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    start_epoch = int(ckpt["epoch"]) + 1
    start_step = int(ckpt.get("step_in_epoch", 0))
    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    if "rng" in ckpt and args.world_size == 1:
        set_rng_state(ckpt["rng"])
    say(f"resumed from {path}: epoch {start_epoch}, iteration {start_step} of {steps_per_epoch}")
    return start_epoch, start_step


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
