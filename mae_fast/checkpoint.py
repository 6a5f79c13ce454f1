"""Checkpoints in and out, safely and loudly.

* Reading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with exactly one
  extra allowed global, ``argparse.Namespace`` (official ``main_pretrain.py`` stores its ``args``
  as one), or a ``.safetensors`` file.
* Official MAE weights (``{"model": state_dict}``) load into a model with positional tables
  resized and encoder-only files reported (``load_official_checkpoint``).
* Training checkpoints of both formats -- official ``checkpoint-N.pth`` (``model``,
  ``optimizer``, ``epoch``, ``scaler``, ``args`` as a Namespace) and mae_fast's (``args`` as a
  dict plus resume extras) -- read into one normalised dict (``load_training_checkpoint``) and
  resume a model + optimizer + scaler (``resume_training``), mapping the optimizer state across
  the two weight-decay group recipes of ``mae_fast.lr_sched`` or saying exactly why it cannot.
* Writing is atomic (temporary file in the same folder, then ``os.replace``), ``.pth`` or
  ``.safetensors`` by the file name (``save_checkpoint``, ``save_state_dict``).
"""
import argparse
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .pos_embed import interpolate_pos_embed

_POS_KEYS = ("pos_embed", "decoder_pos_embed")
CONTRASTIVE_HEAD_PREFIX = "contrastive_head."  # mae_fast.ContrastiveMAE's projector
# The only non-tensor class a trusted checkpoint may contain: official main_pretrain.py saves
# ``args`` as an argparse.Namespace (a plain attribute bag: building one runs no code).
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)
SAFETENSORS_SUFFIX = ".safetensors"
TRAINING_KEYS = ("model", "optimizer", "epoch")
# param-group entries that pick an optimizer implementation: kept from the live optimizer on resume
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optional_import(module: str, pip_name: Optional[str] = None, why: str = ""):
    """Import an optional dependency or raise ImportError naming the pip command."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{why or module} needs the optional package {pip_name or module!r}: "
                          f"pip install {pip_name or module}  ({type(e).__name__}: {e})") from e


def is_safetensors(path) -> bool:
    return os.fspath(path).endswith(SAFETENSORS_SUFFIX)


# ---------------------------------------------------------------------------------------------
# reading
def read_checkpoint(path) -> dict:
    """The object stored in ``path``: a ``.safetensors`` file gives ``{"model": tensors}`` (plus
    ``"metadata"`` when it has any); anything else is ``torch.load``-ed weights-only, with
    ``argparse.Namespace`` the one extra allowed global. ValueError names the file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if is_safetensors(path):
        st = optional_import("safetensors.torch", "safetensors", f"reading {path!r}")
        try:
            sd = st.load_file(path, device="cpu")
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # truncated or not a safetensors file
            raise ValueError(f"could not load {path!r} as a safetensors file ({type(e).__name__}: {e})") from e
        obj = {"model": sd}
        if metadata:
            obj["metadata"] = dict(metadata)
        return obj
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with other objects, or a truncated / corrupt file
        raise ValueError(f"could not load {path!r} as a weights-only checkpoint "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict")
    return obj


def _open(path_or_obj, reader):
    """(the name errors use, the object): a path is read with ``reader``, a dict taken as is."""
    if isinstance(path_or_obj, (str, os.PathLike)):
        return repr(os.fspath(path_or_obj)), reader(path_or_obj)
    return "the checkpoint", path_or_obj


def read_state_dict(path_or_state_dict):
    """A state_dict from a path (never unpickling arbitrary objects; ``.pth`` or
    ``.safetensors``) or from a dict; accepts the official ``{"model": sd}`` wrapper."""
    where, obj = _open(path_or_state_dict, read_checkpoint)
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    sd = obj.get("model", obj)
    if not isinstance(sd, dict):
        raise TypeError(f"{where}: checkpoint['model'] (or the checkpoint) must be a dict of tensors")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}: checkpoint['model'] (or the checkpoint) must be a dict of tensors; "
                            f"key {k!r} holds a {type(v).__name__}")
    return sd


def plain_args(args) -> dict:
    """``args`` of a checkpoint (argparse.Namespace or dict) as a dict of plain values."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise TypeError(f"checkpoint 'args' must be a Namespace or a dict, got {type(args).__name__}")
    return dict(args)


def checkpoint_args(obj: dict) -> dict:
    """The args of a checkpoint ``read_checkpoint`` returned, as a dict: a ``.safetensors`` file's
    metadata (values JSON-decoded where they are JSON) or the ``args`` entry (Namespace or dict);
    {} when it has neither."""
    if "metadata" in obj:
        out = {}
        for k, v in obj["metadata"].items():
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out
    args = obj.get("args")
    return plain_args(args) if isinstance(args, (dict, argparse.Namespace)) else {}


def load_training_checkpoint(path) -> dict:
    """Read an official ``checkpoint-N.pth`` or a mae_fast training checkpoint into one dict:

    ``model`` (state_dict), ``optimizer`` (state_dict), ``epoch`` (last completed epoch, int),
    ``scaler`` (GradScaler state or None), ``args`` (dict; the official Namespace converted),
    ``format`` ("official" or "mae_fast"), ``step_in_epoch`` (0 for official files) and
    mae_fast's extras (``global_step``, ``rng``, ``mae_fast_version``) when present.
    ValueError names the file and the missing key for anything that is not a training checkpoint.
    """
    path = os.fspath(path)
    if is_safetensors(path):
        raise ValueError(f"{path!r} is a safetensors file: it holds weights only, not a training "
                         "checkpoint (optimizer, epoch, scaler); resume from a .pth checkpoint")
    ckpt = read_checkpoint(path)
    for key in TRAINING_KEYS:
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} has no {key!r} entry: not a training checkpoint "
                             f"(it has {sorted(map(str, ckpt))})")
    read_state_dict({"model": ckpt["model"]})  # a dict of tensors
    if not isinstance(ckpt["optimizer"], dict) or "param_groups" not in ckpt["optimizer"]:
        raise ValueError(f"checkpoint {path!r}: 'optimizer' is not an optimizer state_dict")
    out = {k: v for k, v in ckpt.items() if k not in ("args",)}
    out["epoch"] = int(ckpt["epoch"])
    out["scaler"] = ckpt.get("scaler") or None
    out["args"] = plain_args(ckpt.get("args"))
    out["format"] = "mae_fast" if "mae_fast_version" in ckpt else "official"
    out["step_in_epoch"] = int(ckpt.get("step_in_epoch", 0))
    return out


# the recipe keys main_pretrain.py's args carry; a resume of an official run takes these from it
SCHEDULE_KEYS = ("model", "input_size", "mask_ratio", "norm_pix_loss", "epochs", "warmup_epochs", "lr", "blr",
                 "min_lr", "weight_decay", "batch_size", "accum_iter", "seed")


def schedule_from_args(args: dict) -> dict:
    """The recipe values of a checkpoint's args (official names == mae_fast names), those present."""
    return {k: args[k] for k in SCHEDULE_KEYS if k in args}


# ---------------------------------------------------------------------------------------------
# optimizer state across the weight-decay group recipes
def _saved_group_sizes(state: dict) -> List[int]:
    return [len(g["params"]) for g in state["param_groups"]]


def _layout_matches(state: dict, model, names_by_group) -> bool:
    """Does the saved state fit these (no-decay, decay) name lists: sizes, and the shape of
    every per-parameter state tensor (exp_avg etc.) against the parameter it would belong to?"""
    if _saved_group_sizes(state) != [len(n) for n in names_by_group]:
        return False
    for group, names in zip(state["param_groups"], names_by_group):
        for idx, name in zip(group["params"], names):
            shape = model.get_parameter(name).shape
            for v in state["state"].get(idx, {}).values():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shape:
                    return False
    return True


def map_optimizer_state(state: dict, model, optimizer, *, source: str = "the checkpoint") -> tuple:
    """An optimizer state_dict that ``optimizer.load_state_dict`` accepts, from ``state`` saved by
    an AdamW over ``model`` with either weight-decay recipe of ``mae_fast.lr_sched``.

    Returns ``(state_dict, note)``; note is None when the layouts were equal, else says which
    parameters moved between the decay / no-decay groups. Per-parameter state (step, exp_avg,
    exp_avg_sq) follows its parameter; group hyperparameters (lr, betas, ...) come from the
    saved group at the same position (no-decay first, as the official). ValueError says exactly
    why when no recipe explains the saved layout."""
    from .lr_sched import WEIGHT_DECAY_RECIPES, param_group_names

    names = {id(p): n for n, p in model.named_parameters()}
    current = []
    for g in optimizer.param_groups:
        try:
            current.append([names[id(p)] for p in g["params"]])
        except KeyError:
            raise ValueError("the optimizer holds parameters that are not the model's") from None
    saved_sizes = _saved_group_sizes(state)
    if saved_sizes == [len(c) for c in current] and _layout_matches(state, model, current):
        return state, None
    layouts = {r: param_group_names(model, skip) for r, skip in WEIGHT_DECAY_RECIPES.items()}
    found = [r for r, layout in layouts.items() if _layout_matches(state, model, layout)]
    if not found or len(current) != len(state["param_groups"]):
        expected = ", ".join(f"{r!r}: {[len(n) for n in layout]}" for r, layout in layouts.items())
        raise ValueError(
            f"{source}: the optimizer state has param groups of sizes {saved_sizes}, this optimizer "
            f"{[len(c) for c in current]}; the weight-decay recipes give {expected} for this model. "
            "No recipe explains the saved layout (parameter count or shapes differ): the checkpoint "
            "was made for another model or another optimizer")
    saved_recipe = found[0]
    saved_index = {}
    for group, group_names in zip(state["param_groups"], layouts[saved_recipe]):
        saved_index.update(zip(group_names, group["params"]))
    new_groups, new_state, index = [], {}, 0
    for saved_group, group_names in zip(state["param_groups"], current):
        missing = [n for n in group_names if n not in saved_index]
        if missing:
            raise ValueError(f"{source}: the optimizer state has no entry for {missing[:4]}")
        group = {k: v for k, v in saved_group.items() if k != "params"}
        group["params"] = list(range(index, index + len(group_names)))
        for n in group_names:
            if saved_index[n] in state["state"]:
                new_state[index] = state["state"][saved_index[n]]
            index += 1
        new_groups.append(group)
    moved = [n for n in current[0] if n in layouts[saved_recipe][1]] + \
            [n for n in current[1] if n in layouts[saved_recipe][0]] if len(current) == 2 else []
    note = (f"optimizer state saved with the {saved_recipe!r} weight-decay groups {saved_sizes}, mapped to "
            f"this run's {[len(c) for c in current]}: {', '.join(moved) or 'nothing'} changed group")
    return {"state": new_state, "param_groups": new_groups}, note


@dataclass
class ResumeReport:
    start_epoch: int
    start_step: int
    format: str
    args: dict
    notes: List[str] = field(default_factory=list)


def resume_training(path_or_ckpt, model, optimizer, scaler=None) -> ResumeReport:
    """Continue a run from an official ``checkpoint-N.pth`` or a mae_fast checkpoint: load the
    model (strict), the optimizer (mapped across the weight-decay group recipes when needed),
    the GradScaler when it is enabled and the checkpoint has one. The optimizer's implementation
    (``fused``, ``foreach``, ``capturable``) stays the live one's. Returns the epoch / iteration
    to start at, the checkpoint's args (dict) and notes to print (what was mapped).

    ``path_or_ckpt`` is a path or a dict from ``load_training_checkpoint``."""
    source, ckpt = _open(path_or_ckpt, load_training_checkpoint)
    own = model.state_dict()
    for k, v in ckpt["model"].items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    missing = sorted(set(own) - set(ckpt["model"]))
    unexpected = sorted(set(ckpt["model"]) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: model keys differ: missing {missing[:6]}, unexpected {unexpected[:6]}"
                         + _contrastive_hint(missing, unexpected, ckpt.get("args") or {}))
    model.load_state_dict(ckpt["model"])
    state, note = map_optimizer_state(ckpt["optimizer"], model, optimizer, source=source)
    # which kernel runs is this optimizer's choice, not the file's: load_state_dict would take
    # the saved fused/foreach/capturable (an official file has fused=None: the fused step of a
    # mae_fast run would then hand found_inf to the single-tensor AdamW, which refuses it)
    implementation = [{k: g[k] for k in OPTIMIZER_IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, implementation):
        group.update(keep)
    notes = [note] if note else []
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ResumeReport(start_epoch=ckpt["epoch"] + 1, start_step=ckpt.get("step_in_epoch", 0),
                        format=ckpt.get("format", "official"), args=dict(ckpt.get("args", {})), notes=notes)


def _contrastive_hint(missing, unexpected, args) -> str:
    """Why the keys differ when one side is a contrastive run (``contrastive_head.*``, a
    mae_fast.ContrastiveMAE) and the other is not: the run's flag, not the file, is wrong."""
    head = lambda keys: bool(keys) and all(k.startswith(CONTRASTIVE_HEAD_PREFIX) for k in keys)  # noqa: E731
    if head(unexpected) and not missing:
        weight = args.get("contrastive_weight")
        flag = f"--contrastive-weight {weight}" if weight else "--contrastive-weight"
        return (f". The checkpoint was written by a contrastive run (its projector "
                f"{CONTRASTIVE_HEAD_PREFIX}* is in it): resume it with {flag} (the run's setting), "
                "or start a plain run from its weights with load_official_checkpoint, which leaves "
                "the projector out")
    if head(missing) and not unexpected:
        return (". The checkpoint is of a plain MAE run (no contrastive projector): resume it "
                "without --contrastive-weight, or start a contrastive run from its weights with "
                "load_official_checkpoint (the projector is then freshly initialised)")
    return ""


# ---------------------------------------------------------------------------------------------
# writing
def atomic_write(path, write) -> None:
    """``write(tmp_path)`` then fsync and ``os.replace`` onto ``path``: a crash or an exception
    leaves the previous file (or none) and no temporary behind."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_state_dict(path, state_dict: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Weights only, atomically: ``.safetensors`` (metadata values JSON-encoded as strings) or
    anything else as the official ``{"model": state_dict}`` .pth."""
    read_state_dict({"model": state_dict})  # tensors only
    if is_safetensors(path):
        st = optional_import("safetensors.torch", "safetensors", f"writing {os.fspath(path)!r}")
        # safetensors stores no shared or strided storage: one contiguous copy per tensor
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta or None))
    else:
        obj = {"model": state_dict, **({"args": dict(metadata)} if metadata else {})}
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path, obj: dict) -> None:
    """A training checkpoint dict (official layout) with ``torch.save``, atomically. A
    ``.safetensors`` path keeps only ``obj["model"]`` (weights) and ``obj["args"]`` as metadata."""
    if is_safetensors(path):
        save_state_dict(path, obj["model"], metadata=plain_args(obj.get("args")) or None)
    else:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# official weights into a model
@dataclass
class LoadReport:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    # keys of a mae_fast.ContrastiveMAE's projector (contrastive_head.*) that a model without one
    # does not load: not MAE weights, so left out on purpose (not in unexpected_keys)
    ignored_keys: List[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return any(k.startswith(("decoder_", "mask_token")) for k in self.missing_keys)


def load_official_checkpoint(model, path_or_state_dict, *, strict_decoder: bool = True) -> LoadReport:
    """Load official MAE weights into ``model`` (a path -- ``.pth`` incl. official training
    checkpoints, or ``.safetensors`` -- or a dict).

    * positional tables of another image size are resized (official bicubic interpolation);
    * an encoder-only checkpoint (e.g. a fine-tuning release) raises unless
      ``strict_decoder=False``, which loads the encoder, warns, and reports the missing
      decoder keys: a decoder left at random init is never used silently;
    * shape mismatches raise with the file and the key named;
    * the projector of a contrastive MAE (``contrastive_head.*``, ``mae_fast.ContrastiveMAE``) is
      ignored by a model that has none and listed in ``report.ignored_keys``; a ContrastiveMAE
      loading official weights keeps its projector's init (listed in ``report.missing_keys``).
    """
    where = "checkpoint"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = f"checkpoint {os.fspath(path_or_state_dict)!r}:"
    sd = dict(read_state_dict(path_or_state_dict))
    report = LoadReport()
    own = model.state_dict()
    report.ignored_keys = sorted(k for k in sd if k.startswith(CONTRASTIVE_HEAD_PREFIX) and k not in own)
    for k in report.ignored_keys:
        del sd[k]
    for k in _POS_KEYS:
        if k in sd and k in own and sd[k].shape != own[k].shape:
            sd[k] = interpolate_pos_embed(sd[k], model.patch_embed.grid_size)
            report.interpolated.append(k)
    for k, v in sd.items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"{where} {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    report.missing_keys = sorted(k for k in own if k not in sd)
    report.unexpected_keys = sorted(k for k in sd if k not in own)
    encoder_missing = [k for k in report.missing_keys
                       if not k.startswith(("decoder_", "mask_token", CONTRASTIVE_HEAD_PREFIX))]
    if encoder_missing:
        raise ValueError(f"{where} lacks encoder weights: {encoder_missing[:8]}"
                         f"{' ...' if len(encoder_missing) > 8 else ''}")
    decoder_missing = [k for k in report.missing_keys if k.startswith(("decoder_", "mask_token"))]
    if decoder_missing:
        msg = (f"{where} is encoder-only: {len(decoder_missing)} decoder keys missing "
               f"({decoder_missing[:4]} ...); the decoder keeps its random init")
        if strict_decoder:
            raise ValueError(msg + ". Pass strict_decoder=False to load the encoder anyway.")
        warnings.warn(msg, stacklevel=2)
    model.load_state_dict(sd, strict=False)
    return report
