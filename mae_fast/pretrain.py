"""``mae-fast pretrain`` (also ``python -m mae_fast.pretrain``): MAE pretraining, the official recipe.

With no arguments it trains a small MAE (``mae_vit_tiny_patch8``, 64 x 64 images) for a few
minutes on a CPU on real photos shipped inside scikit-image, prints a falling loss, writes a
reconstruction picture per epoch and ends with a linear probe on scikit-learn's digits next to the
same probe on the random initialisation. With ``--model mae_vit_base_patch16 --data-path
/imagenet`` and ``torchrun --nproc_per_node=8`` it is the official ImageNet pretraining.

Recipe (facebookresearch/mae ``main_pretrain.py`` / ``engine_pretrain.py`` / ``PRETRAIN.md``):
AdamW(betas=(0.9, 0.95)), weight decay 0.05 except on 1-D parameters, biases and tokens,
``lr = blr * eff_batch / 256`` with ``eff_batch = batch_size * accum_iter * world_size``, linear
warmup then half-cycle cosine set every iteration, gradient accumulation, RandomResizedCrop(0.2, 1)
+ flip, ``mask_ratio`` 0.75, ``norm_pix_loss`` optional, fp16 autocast with a grad scaler (or bf16).

Exact resume. The crop/flip of every sample and the mask noise of every step are drawn from seeds
derived from ``(seed, epoch, index)`` and ``(seed, rank, step)``, never from a global generator, so
a run resumed from a checkpoint sees the very same images and masks as an uninterrupted run and,
on CPU, reproduces its losses bit for bit. (The global RNG states are saved and restored too.)
A checkpoint is written atomically at the end of every epoch (``checkpoint-last.pth``; also
``checkpoint-<epoch>.pth`` every ``--save-freq`` epochs and at the end, as the official) and,
with ``--save-every-steps K``, every K iterations inside an epoch: a killed run loses at most the
iterations since the last checkpoint. ``--resume auto`` continues from ``checkpoint-last.pth``.
"""
import argparse
import contextlib
import csv
import math
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import lr_sched
from .data import BuiltinImages, DataError, ImageFolder, stack
from .model import (MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14,
                    mae_vit_large_patch16)


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is not finite): reported as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------
# models: the official factories, and a tiny one that trains on a CPU in minutes
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
DEMO_RECIPE = dict(input_size=64, blr=1e-2, epochs=10, warmup_epochs=1, batch_size=64, cpu_threads=1)

# name -> (factory, defaults that depend on the model)
MODELS = {
    "mae_vit_tiny_patch8": (mae_vit_tiny_patch8, DEMO_RECIPE),
    "mae_vit_tiny_patch4": (mae_vit_tiny_patch4, dict(DEMO_RECIPE, input_size=32)),
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


# ---------------------------------------------------------------------------------------------
# command line
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _recipe_epilog() -> str:
    lines = ["defaults marked [model] (input_size, blr, epochs, warmup_epochs, batch_size):"]
    for name, (_, r) in MODELS.items():
        if "_dec512d8b" not in name:
            lines.append(f"  {name}: {r['input_size']} px, blr {r['blr']:g}, {r['epochs']} epochs, "
                         f"warmup {r['warmup_epochs']}, batch {r['batch_size']}")
    lines.append("official ImageNet recipe (PRETRAIN.md): --norm-pix-loss --epochs 800 on 64 GPUs x batch 64 "
                 "(eff. batch 4096; on 8 GPUs add --accum-iter 8)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mae-fast pretrain",
        description="MAE pretraining (official recipe). No arguments: a few-minute CPU demo on "
                    "built-in photos, ending with a linear probe.",
        epilog=_recipe_epilog(), formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"one of: {', '.join(MODELS)}")
    g.add_argument("--input-size", type=int, default=None, help="image side in pixels [model]")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    g.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised pixels as target")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "fast"),
                   help="mae_fast op backend (auto: fused kernels where they run)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="images per process per iteration [model]")
    g.add_argument("--epochs", type=int, default=None, help="[model]")
    g.add_argument("--accum-iter", type=int, default=1, help="iterations per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=float, default=None, help="base lr at batch 256 [model]")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr floor of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=None, help="[model]")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm (official: none)")
    g.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on a GPU that has it, fp16 on other GPUs, none on CPU); "
                        "fp16 uses a grad scaler")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None,
                   help="ImageFolder tree root/<class>/<image> (root/train used if present); "
                        "default: built-in scikit-image photos and faces")
    g.add_argument("--builtin-size", type=int, default=4096, help="samples per epoch of the built-in data")
    g.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop scale=(this, 1)")
    g.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: 0 on CPU, "
                                                                    "min(10, cores / processes) on GPU)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/pretrain", help="checkpoints, log.csv, pictures")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny models on CPU, else torch's choice)")
    g.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' for "
                                                  "OUTPUT_DIR/checkpoint-last.pth when it exists")
    g.add_argument("--save-freq", type=int, default=20, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every K iterations inside an epoch (0: epoch ends only)")
    g.add_argument("--log-every", type=int, default=10, help="iterations between log.csv rows")
    g.add_argument("--num-preview", type=int, default=8, help="images in each reconstruction picture")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--linprobe", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, linear probe on digits: pretrained vs random-init encoder")
    # for tests: stop like `kill -9` after N iterations of this process (no checkpoint, no picture)
    p.add_argument("--simulate-kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace, world_size: int = 1) -> argparse.Namespace:
    """Fill the model-dependent defaults and check every value; UsageError on a bad one."""
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; choose from {', '.join(MODELS)}")
    recipe = MODELS[args.model][1]
    for key in ("input_size", "blr", "epochs", "warmup_epochs", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    checks = [
        (args.batch_size > 0, f"--batch-size must be > 0, got {args.batch_size}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.accum_iter > 0, f"--accum-iter must be > 0, got {args.accum_iter}"),
        (args.input_size > 0, f"--input-size must be > 0, got {args.input_size}"),
        (0.0 <= args.mask_ratio < 1.0, f"--mask-ratio must be in [0, 1), got {args.mask_ratio}"),
        (args.blr > 0 and (args.lr is None or args.lr > 0), "learning rates must be > 0"),
        (args.min_lr >= 0, f"--min-lr must be >= 0, got {args.min_lr}"),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0.0 < args.min_crop_scale <= 1.0, f"--min-crop-scale must be in (0, 1], got {args.min_crop_scale}"),
        (args.builtin_size > 0, f"--builtin-size must be > 0, got {args.builtin_size}"),
        (args.save_every_steps >= 0, f"--save-every-steps must be >= 0, got {args.save_every_steps}"),
        (args.save_every_steps % args.accum_iter == 0,
         f"--save-every-steps ({args.save_every_steps}) must be a multiple of --accum-iter ({args.accum_iter}): "
         "a checkpoint holds no half-accumulated gradient"),
        (args.save_freq > 0, f"--save-freq must be > 0, got {args.save_freq}"),
        (args.log_every > 0, f"--log-every must be > 0, got {args.log_every}"),
        (args.num_preview >= 0, f"--num-preview must be >= 0, got {args.num_preview}"),
        (args.num_workers is None or args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.clip_grad is None or args.clip_grad > 0, "--clip-grad must be > 0"),
        (args.num_threads is None or args.num_threads > 0, "--num-threads must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    if args.data_path is not None and not os.path.isdir(os.path.expanduser(args.data_path)):
        raise UsageError(f"--data-path {args.data_path!r} is not a directory"
                         f"{'' if os.path.exists(os.path.expanduser(args.data_path)) else ' (it does not exist)'}")
    args.world_size = world_size
    args.eff_batch_size = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * args.eff_batch_size / 256
    return args


# ---------------------------------------------------------------------------------------------
# distributed
def init_distributed(device_arg):
    """(rank, world_size, local_rank, device); a process group under torchrun (nccl/gloo)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(want)
    except RuntimeError as e:
        raise UsageError(f"--device {want!r}: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return rank, world_size, local_rank, device, distributed


def all_reduce_mean(value: float, device, distributed: bool) -> float:
    if not distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# ---------------------------------------------------------------------------------------------
# stateless randomness (see the module docstring)
def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return _derived_seed(seed, 1, epoch, index)


def mask_noise(seed: int, rank: int, step: int, n: int, num_patches: int, device) -> torch.Tensor:
    """noise (n, L) in [0, 1) for the masking of global iteration ``step`` on ``rank``."""
    g = torch.Generator(device=device)
    g.manual_seed(_derived_seed(seed, 2, rank, step))
    return torch.rand(n, num_patches, generator=g, device=device)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# checkpoints
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
    from . import __version__
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


# ---------------------------------------------------------------------------------------------
# logging
class CsvLog:
    """log.csv with epoch, step, loss, lr, img_per_s; on resume, rows past the checkpoint go."""
    FIELDS = ("epoch", "step", "loss", "lr", "img_per_s")

    def __init__(self, path: str, resume_step=None):
        self.path = path
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row):
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        self.file.close()


def _tensorboard(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(log_dir=log_dir)


def _progress(total, initial, desc, disable):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # in a log file (no terminal) a bar line every 30 s, not one per update
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                leave=False, file=sys.stderr, mininterval=0.1 if interactive else 30.0)


def resolve_amp(amp: str, device: torch.device):
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# ---------------------------------------------------------------------------------------------
def train(args) -> int:
    rank, world_size, local_rank, device, distributed = init_distributed(args.device)
    threads = torch.get_num_threads()
    try:
        return _train(args, rank, world_size, device, distributed)
    finally:
        torch.set_num_threads(threads)  # --num-threads lasts for this run only (in-process callers)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world_size, device, distributed) -> int:
    args = resolve_args(args, world_size)
    is_main = rank == 0

    def say(msg):
        if is_main:
            print(msg, flush=True)

    if args.num_threads is None and device.type == "cpu":
        args.num_threads = MODELS[args.model][1].get("cpu_threads")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    amp_dtype = resolve_amp(args.amp, device)
    if amp_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp bf16 but this GPU has no bfloat16; use --amp fp16")
    os.makedirs(args.output_dir, exist_ok=True)

    # data first: a bad --data-path fails before anything is built
    if args.data_path is not None:
        dataset = ImageFolder(args.data_path, args.input_size, (args.min_crop_scale, 1.0))
        data_desc = f"ImageFolder {dataset.root}: {len(dataset)} images, {len(dataset.classes)} classes"
    else:
        dataset = BuiltinImages(args.input_size, args.builtin_size, (args.min_crop_scale, 1.0))
        data_desc = (f"built-in: {len(dataset.photo_names)} scikit-image photos + {len(dataset.faces)} "
                     f"LFW-subset images, random crops, {len(dataset)} samples/epoch")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"{len(dataset)} images give no full batch of {args.batch_size} per process "
                         f"({world_size} process(es)); lower --batch-size")

    # the model: same init on every rank (seed), then per-rank seeds as the official
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.input_size, args.norm_pix_loss, args.backend).to(device)
    seed = args.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    optimizer = torch.optim.AdamW(lr_sched.param_groups_weight_decay(model, args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step = 0, 0
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(args.output_dir, "checkpoint-last.pth")
        resume = resume if os.path.exists(resume) else None
    if resume:
        ckpt = load_resume(resume)
        saved = ckpt.get("args", {})
        for key in ("model", "input_size"):
            if key in saved and saved[key] != getattr(args, key):
                raise UsageError(f"--resume {resume}: the checkpoint has {key}={saved[key]!r}, "
                                 f"this run {key}={getattr(args, key)!r}")
        differ = [k for k in ("batch_size", "accum_iter", "world_size", "epochs", "blr", "lr", "seed",
                              "mask_ratio", "norm_pix_loss", "data_path", "builtin_size")
                  if k in saved and saved[k] != getattr(args, k)]
        if differ:
            say(f"note: resuming with different {', '.join(differ)} than the checkpoint: "
                "the loss trajectory will differ from an uninterrupted run")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        start_step = int(ckpt.get("step_in_epoch", 0))
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        if "rng" in ckpt and world_size == 1:
            set_rng_state(ckpt["rng"])
        say(f"resumed from {resume}: epoch {start_epoch}, iteration {start_step} of {steps_per_epoch}")

    model_without_ddp = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    num_workers = args.num_workers
    if num_workers is None:
        num_workers = 0 if device.type != "cuda" else min(10, max(1, (os.cpu_count() or 1) // world_size))

    n_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    say(f"mae-fast pretrain: {args.model} ({n_params / 1e6:.2f}M params), {args.input_size}px, "
        f"patch {model_without_ddp.patch_size}, mask {args.mask_ratio}, norm_pix_loss={args.norm_pix_loss}")
    say(f"data: {data_desc}")
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    say(f"device {device}, {world_size} process(es), amp {amp_name}, "
        f"{torch.get_num_threads()} CPU threads, {num_workers} loader workers")
    say(f"batch {args.batch_size} x accum {args.accum_iter} x {world_size} = {args.eff_batch_size}, "
        f"lr {args.lr:.3g} (blr {args.blr:.3g} x {args.eff_batch_size}/256), wd {args.weight_decay}, "
        f"warmup {args.warmup_epochs} + cosine to epoch {args.epochs}, {steps_per_epoch} it/epoch")
    say(f"output: {os.path.abspath(args.output_dir)}")

    # what each reconstruction picture shows: fixed images, fixed masks
    preview = None
    if is_main and args.num_preview > 0:
        preview_imgs = stack([dataset[i] for i in dataset.preview_indices(args.num_preview)]).to(device)
        g = torch.Generator().manual_seed(args.seed)
        preview = (preview_imgs, torch.rand(preview_imgs.shape[0], model_without_ddp.patch_embed.num_patches,
                                            generator=g).to(device))

    csv_log = CsvLog(os.path.join(args.output_dir, "log.csv"),
                     resume_step=start_epoch * steps_per_epoch + start_step if resume else None) if is_main else None
    tb = _tensorboard(os.path.join(args.output_dir, "tensorboard")) if is_main else None
    if is_main and tb is None:
        say("(tensorboard not installed: logging to log.csv only)")

    num_patches = model_without_ddp.patch_embed.num_patches
    images_per_iter = args.batch_size * world_size
    iterations_run = 0
    first_loss = None
    epoch_losses = []
    t_start = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            batches = [[(idx, sample_seed(args.seed, epoch, idx))
                        for idx in indices[b * args.batch_size:(b + 1) * args.batch_size]]
                       for b in range(steps_per_epoch)]
            skip = start_step if epoch == start_epoch else 0
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], num_workers=num_workers,
                                                 pin_memory=device.type == "cuda", collate_fn=stack)
            model.train(True)
            optimizer.zero_grad(set_to_none=True)
            bar = _progress(steps_per_epoch, skip, f"epoch {epoch + 1}/{args.epochs}",
                            disable=not is_main or args.no_progress)
            loss_sum, loss_count = 0.0, 0
            t_epoch = t_window = time.perf_counter()
            window_images = 0
            for it, imgs in enumerate(loader, start=skip):
                step = epoch * steps_per_epoch + it
                if it % args.accum_iter == 0:
                    lr = lr_sched.adjust_learning_rate(optimizer, it / steps_per_epoch + epoch, args.lr,
                                                       args.min_lr, args.warmup_epochs, args.epochs)
                imgs = imgs.to(device, non_blocking=True)
                noise = mask_noise(args.seed, rank, step, imgs.shape[0], num_patches, device)
                update = (it + 1) % args.accum_iter == 0
                sync = contextlib.nullcontext() if update or not distributed else model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss, _, _ = model(imgs, mask_ratio=args.mask_ratio, noise=noise)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise TrainingError(f"loss is {loss_value} at epoch {epoch}, iteration {it}; stopping")
                    scaler.scale(loss / args.accum_iter).backward()
                if update:
                    if args.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                iterations_run += 1
                window_images += images_per_iter
                loss_sum += loss_value
                loss_count += 1

                if (it + 1) % args.log_every == 0 or it == skip or it + 1 == steps_per_epoch:
                    loss_mean = all_reduce_mean(loss_value, device, distributed)
                    now = time.perf_counter()
                    img_s = window_images / max(now - t_window, 1e-9)
                    t_window, window_images = now, 0
                    if first_loss is None:
                        first_loss = loss_mean
                    if is_main:
                        csv_log.write(epoch=epoch, step=step, loss=f"{loss_mean:.6f}", lr=f"{lr:.6g}",
                                      img_per_s=f"{img_s:.1f}")
                        if tb is not None:
                            tb.add_scalar("train_loss", loss_mean, step)
                            tb.add_scalar("lr", lr, step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                if bar is not None:
                    bar.update(1)

                if args.simulate_kill_after_steps is not None and iterations_run >= args.simulate_kill_after_steps:
                    if bar is not None:
                        bar.close()
                    say(f"(simulated kill after {iterations_run} iterations)")
                    return 137
                if (args.save_every_steps and (it + 1) % args.save_every_steps == 0
                        and it + 1 < steps_per_epoch and is_main):
                    save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"),
                                    checkpoint_dict(model_without_ddp, optimizer, scaler, args,
                                                    epoch - 1, it + 1, step + 1))
            if bar is not None:
                bar.close()

            epoch_loss = all_reduce_mean(loss_sum / max(loss_count, 1), device, distributed)
            epoch_losses.append(epoch_loss)
            epoch_time = time.perf_counter() - t_epoch
            say(f"epoch {epoch + 1}/{args.epochs}: loss {epoch_loss:.4f} (mean of {loss_count} it), "
                f"lr {lr:.3g}, {loss_count * images_per_iter / epoch_time:.0f} img/s, {epoch_time:.1f} s")
            if is_main:
                ckpt = checkpoint_dict(model_without_ddp, optimizer, scaler, args, epoch, 0,
                                       (epoch + 1) * steps_per_epoch)
                save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"), ckpt)
                if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                    save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"), ckpt)
                if tb is not None:
                    tb.add_scalar("epoch_loss", epoch_loss, epoch)
                if preview is not None:
                    from .visualize import save_reconstructions
                    path = save_reconstructions(model_without_ddp, preview[0],
                                                os.path.join(args.output_dir, f"recon-epoch{epoch:03d}.png"),
                                                args.mask_ratio, preview[1])
                    say(f"  wrote {path}  (rows: masked input | reconstruction + visible | original)")
            if distributed:
                dist.barrier()
    finally:
        if csv_log is not None:
            csv_log.close()
        if tb is not None:
            tb.close()

    total = time.perf_counter() - t_start
    if first_loss is not None:
        say(f"done: {iterations_run} iterations in {total:.1f} s ({iterations_run * images_per_iter / total:.0f} img/s); "
            f"loss {first_loss:.4f} (first logged) -> {epoch_losses[-1]:.4f} (last epoch mean)")
    if args.linprobe and is_main:
        from .linprobe import compare_with_random_init
        compare_with_random_init(model_without_ddp, args.model, args.input_size, args.seed, device,
                                 norm_pix_loss=args.norm_pix_loss, backend=args.backend)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed its message (or --help)
        return int(e.code or 0)
    try:
        return train(args)
    except (UsageError, DataError) as e:
        print(f"mae-fast pretrain: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"mae-fast pretrain: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mae-fast pretrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
