"""``mae-fast pretrain`` (also ``python -m mae_fast.pretrain``): MAE pretraining, the official recipe.

With no arguments it trains a small MAE (``mae_vit_tiny_patch8``, 64 x 64 images) for a few
minutes on a CPU on real photos shipped inside scikit-image, prints a falling loss, writes a
reconstruction picture per epoch and ends with a linear probe on scikit-learn's digits next to the
same probe on the random initialisation. With ``--model mae_vit_base_patch16 --data-path
/imagenet`` and ``torchrun --nproc_per_node=8`` it is the official ImageNet pretraining.

Recipe (facebookresearch/mae ``main_pretrain.py`` / ``engine_pretrain.py`` / ``PRETRAIN.md``):
AdamW(betas=(0.9, 0.95)), weight decay 0.05 except on 1-D parameters and biases (the official
groups; ``--weight-decay-recipe no-decay-tokens`` also exempts the cls/mask tokens),
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
iterations since the last checkpoint. ``--resume auto`` continues from ``checkpoint-last.pth``;
``--resume checkpoint-N.pth`` also continues an official ``main_pretrain.py`` run (its schedule
fills the options not given). ``--save-format safetensors`` also writes the weights of every kept
checkpoint as ``checkpoint-<epoch>.safetensors``.

This module is the command line and the wiring; the parts live in ``mae_fast.train`` (seeds,
loader, amp, step, state, log). ``_train`` reads top to bottom: setup, data, model and optimizer,
resume, header, the epoch loop (``_run_epoch``: one ``TrainStep`` per iteration, logging,
mid-epoch checkpoints), end-of-epoch checkpoint and picture, the final probe.
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from . import lr_sched
from .contrastive import DEFAULT_VIEW_MASK_RATIO, ContrastiveMAE
from .data import DECODE_MODES, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DataError, stack
from .knn import KnnMonitor
from .linprobe import compare_with_random_init
from .recipes import (DEFAULT_MODEL, DEMO_RECIPE, MODELS, OFFICIAL_RECIPE, UsageError,  # noqa: F401
                      build_model, default_cpu_threads, mae_vit_tiny_patch4, mae_vit_tiny_patch8)
from .shards import is_shard_spec
from .train.amp import AMP_NAMES, resolve_amp
from .train.loader import BadFiles, EpochBatches, build_dataset, build_loader, default_num_workers, to_device
from .train.log import RunLog, progress_bar
from .train.seeds import mask_noise, rng_state, sample_seed, seed_process, set_rng_state  # noqa: F401
from .train.state import (SAVE_FORMATS, Checkpointer, check_save_format, checkpoint_dict,  # noqa: F401
                          read_resume, resume_path, resume_training, save_checkpoint, schedule_from_official)
from .train.step import LOSS_PARTS, TrainingError, TrainStep, build_optimizer, set_learning_rate
from .train.views import TwoViews


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
    g.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches removed (default: 0.75; 0.5 per view with --contrastive-weight, as CAN)")
    g.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised pixels as target")
    g.add_argument("--decoder-mask-ratio", type=float, default=0.0,
                   help="decoder-side masking: fraction of the masked patches dropped before the decoder "
                        "(loss on the decoded rest); 0 = official")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each encoder/decoder block in the backward pass instead of keeping its "
                        "activations (less memory, about one more forward per step)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fullgraph) for the training step; the compile time is printed once")
    g.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode; reduce-overhead on CUDA (CUDA graphs) also makes AdamW capturable "
                        "with a tensor lr, so the schedule is not frozen into a graph")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager, eager)")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "fast"),
                   help="mae_fast op backend (auto: fused kernels where they run)")
    g.add_argument("--contrastive-weight", type=float, default=0.0,
                   help="> 0: contrastive MAE (CAN-style, mae_fast.ContrastiveMAE): two views per image, "
                        "loss = reconstruction weight x reconstruction + this x InfoNCE over the global batch "
                        "(CAN: 0.03); 0: plain MAE")
    g.add_argument("--reconstruction-weight", type=float, default=None,
                   help="weight of the reconstruction loss with --contrastive-weight (default: 1 - that weight)")
    g.add_argument("--contrastive-temperature", type=float, default=0.1,
                   help="InfoNCE temperature with --contrastive-weight (CAN: 0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="images per process per iteration [model]")
    g.add_argument("--epochs", type=int, default=None, help="[model]")
    g.add_argument("--accum-iter", type=int, default=1, help="iterations per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=float, default=None, help="base lr at batch 256 [model]")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr floor of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=None, help="[model]")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--weight-decay-recipe", default=lr_sched.DEFAULT_WEIGHT_DECAY_RECIPE,
                   choices=tuple(lr_sched.WEIGHT_DECAY_RECIPES),
                   help="which parameters get no weight decay besides 1-D ones and biases: official (none; "
                        "main_pretrain.py's groups, so official checkpoints resume as they are) or "
                        "no-decay-tokens (also cls/mask tokens); a resume across recipes maps the Adam state")
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm (official: none)")
    g.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW kernel (default: where this torch has one for the device, CPU included; "
                        "--no-fused-adamw: the for-each implementation)")
    g.add_argument("--max-bad-steps", type=int, default=3,
                   help="stop after this many consecutive updates with a non-finite loss or gradient "
                        "(each is skipped and counted; the last good checkpoint is kept)")
    g.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on a GPU that has it, fp16 on other GPUs; on a CPU bf16 "
                        "when it has native bf16 and the model is wide enough to gain, else none); "
                        "fp16 uses a grad scaler")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None,
                   help="ImageFolder tree root/<class>/<image> (root/train used if present), or WebDataset "
                        "tar shards 'shards-{000000..000099}.tar' (docs/DATA.md); "
                        "default: built-in scikit-image photos and faces")
    g.add_argument("--builtin-size", type=int, default=4096, help="samples per epoch of the built-in data")
    g.add_argument("--decode", default="auto", choices=DECODE_MODES,
                   help="decoding and crop/resize: auto (torchvision when it imports, else pil), pil (whole "
                        "image), pil-draft (JPEG at a reduced DCT scale when the crop is >= 2x the output), "
                        "torchvision, gpu (JPEGs decoded batched on the CUDA device; CPU otherwise); docs/DATA.md")
    g.add_argument("--input-dtype", default="auto", choices=("auto", "float", "uint8"),
                   help="what the loader ships to the device: uint8 (4x fewer bytes; the model normalises "
                        "inside its kernels, the same numbers as float), or normalised float32; auto: uint8, "
                        "except float with --decode gpu")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable image (default: replace it by another sample, warn, "
                        "count it in log.csv bad_samples)")
    g.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop scale=(this, 1)")
    g.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: 0 on CPU, "
                                                                    "min(10, cores / processes) on GPU)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/pretrain", help="checkpoints, log.csv, pictures")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny models on CPU, else torch's choice)")
    g.add_argument("--resume", default=None,
                   help="training checkpoint to continue from (mae-fast's, or an official main_pretrain.py "
                        "checkpoint-N.pth: its schedule fills the options not given here), or 'auto' for "
                        "OUTPUT_DIR/checkpoint-last.pth when it exists")
    g.add_argument("--save-format", default="pth", choices=SAVE_FORMATS,
                   help="safetensors: also write the weights of every kept checkpoint-<epoch>.pth as "
                        "checkpoint-<epoch>.safetensors (training checkpoints stay .pth to resume)")
    g.add_argument("--save-freq", type=int, default=20, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every K iterations inside an epoch (0: epoch ends only)")
    g.add_argument("--log-every", type=int, default=10, help="iterations between log.csv rows")
    g.add_argument("--num-preview", type=int, default=8, help="images in each reconstruction picture")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--knn-every", type=int, default=None,
                   help="every N epochs (and after the last), kNN accuracy of the encoder's features on a "
                        "labelled set, printed and logged (0: off; default: every 5 epochs for the demo model "
                        "mae_vit_tiny_patch8, off for the others)")
    g.add_argument("--knn-data", default=None,
                   help="ImageFolder with class sub-folders for the kNN monitor (default: scikit-learn digits)")
    g.add_argument("--linprobe", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, linear probe on digits: pretrained vs random-init encoder")
    # for tests: stop like `kill -9` after N iterations of this process (no checkpoint, no picture)
    p.add_argument("--simulate-kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    # for tests: NaN images at these global iterations (comma-separated)
    p.add_argument("--simulate-nan-at-steps", type=_int_set, default=frozenset(), help=argparse.SUPPRESS)
    return p


def given_options(parser: argparse.ArgumentParser, argv) -> frozenset:
    """The option dests named on the command line ``argv`` (parsed again with every default
    suppressed): what an official checkpoint's schedule must not override."""
    defaults = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return frozenset(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def _int_set(text: str) -> frozenset:
    return frozenset(int(v) for v in text.split(",") if v.strip())


def _resolve_input_dtype(args) -> str:
    """--input-dtype auto: uint8 batches (the model normalises them in its kernels, bit for bit
    the float batches' numbers: docs/DATA.md), except where uint8 is not wired yet: --decode gpu
    (it normalises on the GPU). The two-view contrastive data ships uint8 too (both views;
    test_input_dtype_uint8_trains_the_same_as_float[contrastive])."""
    if args.input_dtype != "auto":
        return args.input_dtype
    if getattr(args, "decode", "auto") == "gpu":
        return "float"
    return "uint8"


def resolve_args(args: argparse.Namespace, world_size: int = 1) -> argparse.Namespace:
    """Fill the model-dependent defaults and check every value; UsageError on a bad one."""
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; choose from {', '.join(MODELS)}")
    recipe = MODELS[args.model][1]
    for key in ("input_size", "blr", "epochs", "warmup_epochs", "batch_size", "knn_every"):
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, 0))
    _resolve_contrastive(args)
    args.input_dtype = _resolve_input_dtype(args)
    checks = [
        (args.batch_size > 0, f"--batch-size must be > 0, got {args.batch_size}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.accum_iter > 0, f"--accum-iter must be > 0, got {args.accum_iter}"),
        (args.input_size > 0, f"--input-size must be > 0, got {args.input_size}"),
        (0.0 <= args.mask_ratio < 1.0, f"--mask-ratio must be in [0, 1), got {args.mask_ratio}"),
        (0.0 <= args.decoder_mask_ratio < 1.0,
         f"--decoder-mask-ratio must be in [0, 1), got {args.decoder_mask_ratio}"),
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
        (args.knn_every >= 0, f"--knn-every must be >= 0, got {args.knn_every}"),
        (args.max_bad_steps > 0, f"--max-bad-steps must be > 0, got {args.max_bad_steps}"),
        (args.num_preview >= 0, f"--num-preview must be >= 0, got {args.num_preview}"),
        (args.num_workers is None or args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.clip_grad is None or args.clip_grad > 0, "--clip-grad must be > 0"),
        (args.num_threads is None or args.num_threads > 0, "--num-threads must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    if args.knn_data is not None and not os.path.isdir(os.path.expanduser(args.knn_data)):
        raise UsageError(f"--knn-data {args.knn_data!r} is not a directory")
    if args.data_path is not None and not is_shard_spec(args.data_path) \
            and not os.path.isdir(os.path.expanduser(args.data_path)):
        raise UsageError(f"--data-path {args.data_path!r} is not a directory"
                         f"{'' if os.path.exists(os.path.expanduser(args.data_path)) else ' (it does not exist)'}")
    args.world_size = world_size
    args.eff_batch_size = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * args.eff_batch_size / 256
    return args


def _resolve_contrastive(args) -> None:
    """--mask-ratio default (0.75, or CAN's 0.5 per view with --contrastive-weight) and the
    contrastive options' checks."""
    weight = getattr(args, "contrastive_weight", 0.0) or 0.0
    if getattr(args, "mask_ratio", None) is None:
        args.mask_ratio = DEFAULT_VIEW_MASK_RATIO if weight > 0 else 0.75
    if not hasattr(args, "contrastive_weight"):
        return
    if not weight >= 0:
        raise UsageError(f"--contrastive-weight must be >= 0, got {args.contrastive_weight}")
    if weight > 0:
        rec = args.reconstruction_weight
        if rec is None and weight > 1:
            raise UsageError(f"--contrastive-weight {weight} > 1 leaves a negative reconstruction weight "
                             "(1 - it); give --reconstruction-weight")
        if rec is not None and not rec >= 0:
            raise UsageError(f"--reconstruction-weight must be >= 0, got {rec}")
        if not args.contrastive_temperature > 0:
            raise UsageError(f"--contrastive-temperature must be > 0, got {args.contrastive_temperature}")


def contrastive_on(args) -> bool:
    return (getattr(args, "contrastive_weight", 0.0) or 0.0) > 0


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


# ---------------------------------------------------------------------------------------------
# the run
def train(args, given=None) -> int:
    """Run ``args`` (from ``build_parser``); ``given``: the option dests the user named (default:
    those whose value differs from the parser's default), which an official --resume leaves alone."""
    if given is None:
        defaults = vars(build_parser().parse_args([]))
        given = frozenset(k for k, v in vars(args).items() if k not in defaults or v != defaults[k])
    rank, world_size, local_rank, device, distributed = init_distributed(args.device)
    threads = torch.get_num_threads()
    try:
        return _train(args, rank, world_size, device, distributed, given)
    finally:
        torch.set_num_threads(threads)  # --num-threads lasts for this run only (in-process callers)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world_size, device, distributed, given=frozenset()) -> int:
    resume = _read_resume(args, given, print_on(rank == 0))
    args = resolve_args(args, world_size)
    check_save_format(args)
    _setup_threads(args, device)
    os.makedirs(args.output_dir, exist_ok=True)
    run = _setup_run(args, rank, world_size, device, distributed, resume)

    t_start = time.perf_counter()
    epoch_loss = None
    try:
        for epoch in range(run.start_epoch, args.epochs):
            epoch_loss = _run_epoch(run, epoch, run.start_step if epoch == run.start_epoch else 0)
            if epoch_loss is None:  # --simulate-kill-after-steps
                return 137
            _end_epoch(run, epoch, epoch_loss)
    finally:
        run.log.close()

    total = time.perf_counter() - t_start
    if run.first_loss is not None:
        run.say(f"done: {run.iterations_run} iterations in {total:.1f} s "
                f"({run.iterations_run * run.images_per_iter / total:.0f} img/s); "
                f"loss {run.first_loss:.4f} (first logged) -> {epoch_loss:.4f} (last epoch mean)")
    if args.linprobe and run.is_main:
        compare_with_random_init(run.model_without_ddp, args.model, args.input_size, args.seed, device,
                                 norm_pix_loss=args.norm_pix_loss, backend=args.backend, amp_dtype=run.amp_dtype)
    return 0


def _read_resume(args, given, say):
    """(path, checkpoint) of --resume, or None; an official checkpoint's schedule fills the
    options the user did not give, before they are resolved."""
    path = resume_path(args.resume, args.output_dir)
    if not path:
        return None
    ckpt = read_resume(path)
    if ckpt["format"] == "official":
        taken = schedule_from_official(ckpt, args, given)
        say(f"official checkpoint {path}: the schedule not given here comes from its args: "
            f"{', '.join(taken) or 'nothing'}")
    return path, ckpt


def _setup_run(args, rank, world_size, device, distributed, resume=None) -> SimpleNamespace:
    """Everything a run needs, in order: data, model, amp, optimizer, resume, DDP/compile, loader,
    header, preview, kNN monitor, logs, the step and the checkpointer."""
    is_main = rank == 0
    say = print_on(is_main)
    # data first: a bad --data-path fails before anything is built
    dataset, data_desc = build_dataset(args, device)
    if contrastive_on(args):  # two augmented views per image (TwoViews: view 0 is the plain run's sample)
        if args.decode == "gpu":  # TwoViews stacks decoded views; --decode gpu ships encoded JPEGs
            raise UsageError("--contrastive-weight does not work with --decode gpu yet: use a CPU decode mode")
        dataset, data_desc = TwoViews(dataset), data_desc + ", two views per sample"
    batches = EpochBatches(dataset, args.batch_size, args.seed, rank, world_size)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch < 1:
        raise UsageError(f"{len(dataset)} images give no full batch of {args.batch_size} per process "
                         f"({world_size} process(es)); lower --batch-size")

    # the model: same init on every rank (seed), then per-rank seeds as the official
    torch.manual_seed(args.seed)
    model_without_ddp = build_model(args.model, args.input_size, args.norm_pix_loss, args.backend).to(device)
    if contrastive_on(args):  # the plain model's initialisation, plus the projector
        model_without_ddp = ContrastiveMAE.from_mae(
            model_without_ddp, contrastive_weight=args.contrastive_weight,
            reconstruction_weight=args.reconstruction_weight, temperature=args.contrastive_temperature,
            view_mask_ratio=args.mask_ratio)
    # uint8 batches (--input-dtype uint8, pixels 0..255) are normalised inside the kernels with the
    # float pipeline's statistics (docs/DATA.md); float batches are unaffected, checkpoints unchanged
    model_without_ddp.set_input_normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    seed_process(args.seed + rank)
    model_without_ddp.set_grad_checkpointing(args.grad_checkpointing)
    model_without_ddp.set_decoder_mask_ratio(args.decoder_mask_ratio)
    amp_dtype, amp_reason = resolve_amp(args.amp, device, width=model_without_ddp.cls_token.shape[-1])
    if amp_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp bf16 but this GPU has no bfloat16; use --amp fp16")
    try:
        optimizer = build_optimizer(model_without_ddp, args, device, capturable=_cuda_graphs(args, device))
    except ValueError as e:
        raise UsageError(str(e)) from e
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step = 0, 0
    if resume:
        start_epoch, start_step = resume_training(resume[1], resume[0], args, model_without_ddp, optimizer,
                                                  scaler, steps_per_epoch, say)
    model = model_without_ddp
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = _compile(args, model) if args.compile else None
    num_workers = args.num_workers if args.num_workers is not None else default_num_workers(device, world_size)
    loader = build_loader(dataset, batches, num_workers, device)

    _print_header(say, args, model_without_ddp, optimizer, data_desc, device, world_size, amp_dtype, amp_reason,
                  num_workers, steps_per_epoch)
    preview = _preview(args, dataset, model_without_ddp, device) if is_main else None
    knn = KnnMonitor(args.input_size, args.knn_data, args.seed, amp_dtype=amp_dtype) \
        if is_main and args.knn_every else None
    log = RunLog(args.output_dir, is_main, resume_step=start_epoch * steps_per_epoch + start_step if resume else None,
                 fields=("epoch", "step", "loss", "lr", "img_per_s", "bad_steps", "bad_samples", "knn_acc")
                 + (LOSS_PARTS if contrastive_on(args) else ()))
    return SimpleNamespace(
        args=args, rank=rank, device=device, distributed=distributed, is_main=is_main, say=say, log=log,
        model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, batches=batches, loader=loader,
        dataset=dataset,
        step=TrainStep(model, optimizer, scaler, amp_dtype, device, args, distributed, forward=forward,
                       report_first=_report_compile(say, args) if args.compile else None),
        t_window=0.0, window_images=0, bad_files=BadFiles(args.strict_data, rank),
        checkpointer=Checkpointer(args, model_without_ddp, optimizer, scaler, steps_per_epoch, is_main),
        images_per_iter=args.batch_size * world_size, iterations_run=0, first_loss=None, lr=args.lr,
        amp_dtype=amp_dtype, preview=preview, knn=knn, start_epoch=start_epoch, start_step=start_step)



def print_on(is_main: bool):
    def say(msg):
        if is_main:
            print(msg, flush=True)
    return say


def _setup_threads(args, device):
    """CPU threads for this run (--num-threads, or the model's default on CPU)."""
    if args.num_threads is None and device.type == "cpu":
        args.num_threads = default_cpu_threads(args.model)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)


def _cuda_graphs(args, device) -> bool:
    """--compile-mode reduce-overhead on CUDA captures CUDA graphs: the optimizer must be capturable."""
    return args.compile and args.compile_mode == "reduce-overhead" and device.type == "cuda"


def _compile(args, model):
    """The compiled training forward (the weights stay those of ``model``; checkpoints, pictures and
    probes use the uncompiled module). Compilation itself happens at the first step."""
    try:
        return torch.compile(model, fullgraph=True, mode=None if args.compile_mode == "default" else args.compile_mode,
                             backend=args.compile_backend)
    except Exception as e:  # unknown backend, mode not supported by the backend
        raise UsageError(f"--compile: {type(e).__name__}: {e}") from e


def _report_compile(say, args):
    def report(seconds):
        say(f"torch.compile (fullgraph, backend {args.compile_backend}, mode {args.compile_mode}): "
            f"first iteration, compile included, took {seconds:.1f} s")
    return report


def _print_header(say, args, model, optimizer, data_desc, device, world_size, amp_dtype, amp_reason, num_workers,
                  steps_per_epoch):
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"mae-fast pretrain: {args.model} ({n_params / 1e6:.2f}M params), {args.input_size}px, "
        f"patch {model.patch_size}, mask {args.mask_ratio}, norm_pix_loss={args.norm_pix_loss}")
    if args.decoder_mask_ratio:
        from .info import decoder_masking_line
        say(decoder_masking_line(args.decoder_mask_ratio, model.patch_embed.num_patches, args.mask_ratio))
    say(f"data: {data_desc}")
    say(f"device {device}, {world_size} process(es), amp {AMP_NAMES[amp_dtype]} ({amp_reason}), "
        f"{torch.get_num_threads()} CPU threads, {num_workers} loader workers")
    say(f"batch {args.batch_size} x accum {args.accum_iter} x {world_size} = {args.eff_batch_size}, "
        f"lr {args.lr:.3g} (blr {args.blr:.3g} x {args.eff_batch_size}/256), wd {args.weight_decay}, "
        f"warmup {args.warmup_epochs} + cosine to epoch {args.epochs}, {steps_per_epoch} it/epoch, "
        f"{'fused' if optimizer.defaults.get('fused') else 'for-each'} AdamW")
    if isinstance(model, ContrastiveMAE):
        say(f"{model.describe()}; global batch {args.batch_size * world_size} images "
            f"({2 * args.batch_size * world_size - 2} negatives per anchor)")
    say(f"output: {os.path.abspath(args.output_dir)}")


def _preview(args, dataset, model, device):
    """(images, mask noise) each reconstruction picture shows: the same in every epoch."""
    if args.num_preview <= 0:
        return None
    imgs = stack([dataset.load(i)[0] for i in dataset.preview_indices(args.num_preview)]).to(device)
    g = torch.Generator().manual_seed(args.seed)
    return imgs, torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=g).to(device)


def _run_epoch(run, epoch: int, skip: int):
    """Iterations ``skip``.. of ``epoch``; returns the epoch's mean loss (None: simulated kill).
    The host reads device values only at log rows, checkpoints and the end of the epoch."""
    args, spe = run.args, run.batches.steps_per_epoch
    run.batches.set_epoch(epoch, skip)
    run.model.train(True)
    run.optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(spe, skip, f"epoch {epoch + 1}/{args.epochs}", disable=not run.is_main or args.no_progress)
    num_patches = run.model_without_ddp.patch_embed.num_patches
    t_epoch = run.t_window = time.perf_counter()
    run.window_images = 0
    for it, (imgs, bad_files) in enumerate(run.loader, start=skip):
        run.bad_files.note(bad_files)
        step = epoch * spe + it
        if it % args.accum_iter == 0:
            run.lr = set_learning_rate(run.optimizer, it / spe + epoch, args)
        imgs, late_bad = to_device(imgs, run.device, run.dataset)  # (N, 3, H, W); --decode gpu decodes here
        run.bad_files.note(late_bad)
        if step in args.simulate_nan_at_steps:  # a float batch of NaNs (uint8 has no NaN)
            imgs = torch.full(imgs.shape, float("nan"), device=imgs.device)
        if imgs.dim() == 5:  # two views per image (--contrastive-weight): noise (N, 2, L)
            noise = mask_noise(args.seed, run.rank, step, imgs.shape[0] * imgs.shape[1], num_patches,
                               run.device).view(imgs.shape[0], imgs.shape[1], num_patches)
        else:
            noise = mask_noise(args.seed, run.rank, step, imgs.shape[0], num_patches, run.device)
        run.step(imgs, noise, it, step)
        run.iterations_run += 1
        run.window_images += run.images_per_iter
        if (it + 1) % args.log_every == 0 or it == skip or it + 1 == spe:
            _log_row(run, epoch, step, bar)
        if bar is not None:
            bar.update(1)

        if args.simulate_kill_after_steps is not None and run.iterations_run >= args.simulate_kill_after_steps:
            if bar is not None:
                bar.close()
            run.say(f"(simulated kill after {run.iterations_run} iterations)")
            return None
        if run.checkpointer.due_mid_epoch(it):
            _check_bad_steps(run)  # never overwrite the last good checkpoint after a bad streak
            run.checkpointer.save_mid_epoch(epoch, it + 1)
    if bar is not None:
        bar.close()
    epoch_loss, loss_count = run.step.read_epoch()
    bad_total = _check_bad_steps(run)
    epoch_time = time.perf_counter() - t_epoch
    skipped = f", {bad_total} non-finite updates skipped so far" if bad_total else ""
    run.say(f"epoch {epoch + 1}/{args.epochs}: loss {epoch_loss:.4f} (mean of {loss_count} it), "
            f"lr {run.lr:.3g}, {(spe - skip) * run.images_per_iter / epoch_time:.0f} img/s, {epoch_time:.1f} s"
            f"{skipped}")
    return epoch_loss


def _log_row(run, epoch: int, step: int, bar) -> None:
    """One log.csv / TensorBoard row: the mean loss since the last row (one host read)."""
    loss_mean = run.step.read_window()
    bad_total = _check_bad_steps(run)
    now = time.perf_counter()
    img_s = run.window_images / max(now - run.t_window, 1e-9)
    run.t_window, run.window_images = now, 0
    if run.first_loss is None:
        run.first_loss = loss_mean
    parts = run.step.window_parts  # {"loss_rec": ..., "loss_con": ...} with --contrastive-weight
    run.log.row(step, {"train_loss": loss_mean, "lr": run.lr, **{f"train_{k}": v for k, v in parts.items()}},
                epoch=epoch, loss=f"{loss_mean:.6f}",
                lr=f"{run.lr:.6g}", img_per_s=f"{img_s:.4g}", bad_steps=bad_total,
                bad_samples=run.bad_files.take_window(), **{k: f"{v:.6f}" for k, v in parts.items()})
    if bar is not None:
        bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{run.lr:.2e}", img_s=f"{img_s:.0f}")


def _check_bad_steps(run) -> int:
    """Total skipped updates so far; TrainingError once --max-bad-steps of them came in a row."""
    total, longest, start = run.step.bad_steps()
    if longest >= run.args.max_bad_steps:
        raise TrainingError(
            f"{longest} consecutive updates had a non-finite loss or gradient (the first at global iteration "
            f"{start}; {total} skipped in all); stopping. Last good checkpoint: {run.checkpointer.last_saved}")
    return total


def _end_epoch(run, epoch: int, epoch_loss: float) -> None:
    """Checkpoints, the epoch's TensorBoard scalar, kNN accuracy and reconstruction picture, the DDP barrier."""
    run.checkpointer.save_epoch_end(epoch)
    if run.log.tb is not None:
        run.log.tb.add_scalar("epoch_loss", epoch_loss, epoch)
    knn, preview = run.knn, run.preview
    if knn is not None and ((epoch + 1) % run.args.knn_every == 0 or epoch + 1 == run.args.epochs):
        t = time.perf_counter()
        acc = knn(run.model_without_ddp)
        step = (epoch + 1) * run.batches.steps_per_epoch - 1
        run.log.row(step, {"knn_acc": acc}, epoch=epoch, knn_acc=f"{acc:.4f}")
        run.say(f"  kNN accuracy on {knn.name} (k={knn.k}, encoder features, 25% held out): {100 * acc:.1f}% "
                f"({time.perf_counter() - t:.1f} s)")
    if preview is not None:
        from .visualize import save_reconstructions
        path = save_reconstructions(run.model_without_ddp, preview[0],
                                    os.path.join(run.args.output_dir, f"recon-epoch{epoch:03d}.png"),
                                    run.args.mask_ratio, preview[1])
        run.say(f"  wrote {path}  (rows: masked input | reconstruction + visible | original)")
    if run.distributed:
        dist.barrier()


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed its message (or --help)
        return int(e.code or 0)
    try:
        return train(args, given_options(parser, argv))
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
