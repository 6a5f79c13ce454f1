"""``mae-fast bench-data``: images/s of the training data loader alone (no model), so a user can see
whether the data or the model/GPU is the limit of a run.

It builds the trainer's own loader (``train.loader``: the same data set, ``EpochBatches`` keys,
``DataLoader`` with persistent workers, the same collate) for each ``--num-workers`` value, draws
``--warmup`` batches (worker start-up, file cache), then times ``--batches`` batches. Compare the
printed img/s with the img/s ``mae-fast pretrain`` prints for the same settings: if the loader
alone is not well above it, the data is the limit (more workers, smaller images on disk...).
``--decode`` and ``--input-dtype`` take comma-separated lists to compare modes (docs/DATA.md).
"""
import argparse
import sys
import time

import torch

from .data import DECODE_MODES, OUTPUTS, DataError
from .train.loader import EpochBatches, build_dataset, build_loader, to_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mae-fast bench-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", default=None,
                   help="ImageFolder tree root/<class>/<image> or tar shards 'shards-{000..009}.tar' "
                        "(default: the built-in images)")
    p.add_argument("--builtin-size", type=int, default=4096, help="samples per epoch of the built-in data")
    p.add_argument("--input-size", type=int, default=224, help="output image side in pixels")
    p.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop scale=(this, 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", default="0", help="comma-separated loader worker counts to compare, e.g. 0,1,2")
    p.add_argument("--decode", default="auto",
                   help=f"comma-separated decode modes to compare ({', '.join(DECODE_MODES)}); the built-in "
                        f"images (decoded once) take auto, pil, torchvision")
    p.add_argument("--input-dtype", default="float",
                   help=f"comma-separated batch dtypes to compare ({', '.join(OUTPUTS)}): what the loader ships")
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start, file cache)")
    p.add_argument("--device", default="cpu",
                   help="'cuda' also pins the batches and copies them to the GPU (as the trainer does)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads of the main process")
    p.add_argument("--seed", type=int, default=0)
    return p


def _worker_counts(text: str):
    try:
        counts = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise DataError(f"--num-workers {text!r}: give comma-separated counts >= 0, e.g. 0,2")
    return counts


def _batches_of(loader, batches: EpochBatches):
    """Batches of epoch 0, 1, ... one after another (as many as the caller takes)."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(dataset, batch_size: int, num_workers: int, n_batches: int, warmup: int, seed: int,
            device: torch.device) -> dict:
    """Time ``n_batches`` batches of the trainer's loader after ``warmup``: images/s and ms per batch."""
    batches = EpochBatches(dataset, batch_size, seed)
    loader = build_loader(dataset, batches, num_workers, device)
    it = _batches_of(loader, batches)
    bad = 0
    for _ in range(warmup):
        imgs, bad_files = next(it)
        to_device(imgs, device, dataset)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        imgs, bad_files = next(it)  # (N, 3, H, W), or the encoded JPEGs of --decode gpu
        imgs, late_bad = to_device(imgs, device, dataset)
        bad += len(bad_files) + len(late_bad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del it, loader  # ends the workers
    return {"workers": num_workers, "img_s": n_batches * batch_size / seconds,
            "ms_batch": 1e3 * seconds / n_batches, "dtype": str(imgs.dtype).replace("torch.", ""),
            "bytes_img": imgs[0].numel() * imgs.element_size(), "bad_samples": bad}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its message (or --help)
        return int(e.code or 0)
    try:
        if args.batch_size < 1 or args.batches < 1 or args.warmup < 0:
            raise DataError("--batch-size and --batches must be > 0, --warmup >= 0")
        counts = _worker_counts(args.num_workers)
        device = torch.device(args.device)
        if args.num_threads is not None:
            torch.set_num_threads(args.num_threads)
        modes = [m.strip() for m in args.decode.split(",") if m.strip()]
        dtypes = [d.strip() for d in args.input_dtype.split(",") if d.strip()]
        bad_dtype = [d for d in dtypes if d not in OUTPUTS]
        if not dtypes or bad_dtype:
            raise DataError(f"--input-dtype {args.input_dtype!r}: comma-separated, each one of {', '.join(OUTPUTS)}")
        print(f"{args.input_size}px, batch {args.batch_size}, {args.warmup} warm-up + {args.batches} timed batches, "
              f"device {device}, {torch.get_num_threads()} torch threads in the main process")
        header = f"{'decode':>11} {'workers':>7} {'img/s':>9} {'ms/batch':>9} {'dtype':>8} {'KiB/img':>8} {'bad':>4}"
        for mode, dtype in [(m, d) for m in modes for d in dtypes]:
            args.decode, args.input_dtype = mode, dtype
            dataset, desc = build_dataset(args, device)
            if len(dataset) < args.batch_size:
                raise DataError(f"{len(dataset)} images give no full batch of {args.batch_size}; lower --batch-size")
            print(f"bench-data: {desc}")
            print(header)
            for w in counts:
                r = measure(dataset, args.batch_size, w, args.batches, args.warmup, args.seed, device)
                label = dataset.decode
                print(f"{label:>11} {r['workers']:>7} {r['img_s']:>9.1f} {r['ms_batch']:>9.1f} {r['dtype']:>8} "
                      f"{r['bytes_img'] / 1024:>8.0f} {r['bad_samples']:>4}", flush=True)
    except DataError as e:
        print(f"mae-fast bench-data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
