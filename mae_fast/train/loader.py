"""The data part: the data set, the batches of an epoch, and one loader for the whole run.

Each batch is a list of ``(index, sample_seed)`` keys (see ``seeds``), drawn from a
``DistributedSampler`` shuffled by ``(seed, epoch)``. ``EpochBatches.set_epoch(epoch, skip)``
chooses the epoch (and the iterations a resumed run skips); the ``DataLoader`` built once on it
re-reads the batches at every ``iter(loader)``, so with ``--num-workers`` > 0 the same worker
processes serve every epoch (``persistent_workers``) and the pixels stay a function of the keys only.

The loader yields ``(images, bad_files)``: an unreadable image is replaced inside the data set by a
substitute drawn from its key (``data._Images.load``), and its ``(path, reason)`` travels with the
batch to the main process, where ``BadFiles`` warns (once per file), counts, or, with
``--strict-data``, stops.
"""
import os
import sys

import torch

from .seeds import sample_seed
from ..data import BuiltinImages, DataError, GpuJpeg, ImageFolder, decode_gpu_batch, stack
from ..shards import TarShards, is_shard_spec


def build_dataset(args, device=None):
    """(dataset, one-line description) for --data-path (an ImageFolder tree, or WebDataset tar shards
    ``*.tar`` / ``shards-{000..099}.tar``) or the built-in images. ``device``: the run's device
    (``--decode gpu`` decodes there when it is a CUDA GPU)."""
    decode = getattr(args, "decode", "auto")
    output = getattr(args, "input_dtype", "float")
    scale = (args.min_crop_scale, 1.0)
    cuda = device is not None and torch.device(device).type == "cuda"
    if args.data_path is not None and is_shard_spec(args.data_path):
        dataset = TarShards(args.data_path, args.input_size, scale, decode, output, cuda)
        skipped = f", {dataset.skipped} samples without an image skipped" if dataset.skipped else ""
        return dataset, (f"tar shards {dataset.root}: {len(dataset.shards)} shard(s), {len(dataset)} images, "
                         f"labels from .cls{skipped}; decode {dataset.decode} ({dataset.decode_why}), "
                         f"{output} batches")
    if args.data_path is not None:
        dataset = ImageFolder(args.data_path, args.input_size, scale, decode, output, cuda)
        return dataset, (f"ImageFolder {dataset.root}: {len(dataset)} images, {len(dataset.classes)} classes, "
                         f"decode {dataset.decode} ({dataset.decode_why}), {output} batches")
    dataset = BuiltinImages(args.input_size, args.builtin_size, scale, decode, output)
    return dataset, (f"built-in: {len(dataset.photo_names)} scikit-image photos + {len(dataset.faces)} "
                     f"LFW-subset images, random crops, {len(dataset)} samples/epoch; crops by {dataset.decode} "
                     f"({dataset.decode_why}), {output} batches")


class EpochBatches(torch.utils.data.Sampler):
    """Batch sampler: the full batches of this rank's shard of epoch ``epoch``, from ``skip`` on."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                         shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(self.shard) // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.shard.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        indices = list(self.shard)
        bs = self.batch_size
        for b in range(self.skip, self.steps_per_epoch):
            yield [(idx, sample_seed(self.seed, self.epoch, idx)) for idx in indices[b * bs:(b + 1) * bs]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip


def default_num_workers(device: torch.device, world_size: int) -> int:
    """0 on CPU (the workers would take the cores the model needs), min(10, cores / processes) on GPU."""
    return 0 if device.type != "cuda" else min(10, max(1, (os.cpu_count() or 1) // world_size))


class _Loading(torch.utils.data.Dataset):
    """``dataset.load`` as ``__getitem__``: (sample, bad files); a data set without ``load`` has none."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if hasattr(self.dataset, "load"):
            return self.dataset.load(key)
        return self.dataset[key], ()


def collate(samples):
    """[(sample, bad files)] -> (images (N, ...), bad files of the batch). Under ``--decode gpu`` the
    JPEGs are still encoded (``GpuJpeg``): the images are then the list of samples, which
    ``to_device`` decodes on the GPU."""
    views = [s for s, _ in samples]
    bad = tuple(b for _, bad in samples for b in bad)
    if any(isinstance(v, GpuJpeg) for v in views):
        return GpuBatch(views), bad
    return stack(views), bad


class GpuBatch(list):
    """A batch whose JPEGs ``to_device`` decodes on the GPU (``--decode gpu``)."""


def to_device(images, device: torch.device, dataset):
    """(images on ``device``, bad files found there): a collated batch copied (pinned memory:
    asynchronously), or a ``GpuBatch`` decoded on the GPU (``data.decode_gpu_batch``; a JPEG the
    GPU rejects is retried on the CPU and, unreadable, substituted and reported)."""
    if isinstance(images, GpuBatch):
        return decode_gpu_batch(images, device, dataset)
    return images.to(device, non_blocking=True), ()


def build_loader(dataset, batches: EpochBatches, num_workers: int, device: torch.device):
    """One DataLoader for the whole run, yielding ``(images, bad_files)``: its workers (if any)
    persist across epochs."""
    return torch.utils.data.DataLoader(_Loading(dataset), batch_sampler=batches, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       pin_memory=device.type == "cuda", collate_fn=collate)


class BadFiles:
    """The unreadable files the loader passed over, in the main process: a warning with the path the
    first time a file is met, the replaced samples counted per log window, or (``strict``) a
    ``DataError`` naming the first one."""

    def __init__(self, strict: bool, rank: int = 0):
        self.strict = strict
        self.rank = rank
        self.paths = set()
        self.window = 0  # samples replaced since the last take_window()
        self.total = 0

    def note(self, bad) -> None:
        if bad and self.strict:
            path, reason = bad[0]
            raise DataError(f"cannot read image {path!r}: {reason} (--strict-data stops at the first "
                            f"unreadable image; without it, it is replaced by another sample and counted)")
        for path, reason in bad:
            if path not in self.paths:
                self.paths.add(path)
                where = f"rank {self.rank}: " if self.rank else ""
                print(f"mae-fast: warning: {where}skipping unreadable image {path!r} ({reason}); another "
                      f"sample takes its place (counted in log.csv bad_samples; --strict-data to stop instead)",
                      file=sys.stderr, flush=True)
        self.window += len(bad)
        self.total += len(bad)

    def take_window(self) -> int:
        n, self.window = self.window, 0
        return n
