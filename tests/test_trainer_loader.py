"""--num-workers: one loader for the run whose workers persist across epochs, with the same
pixels as the in-process loader (stateless per-sample randomness) and exact resume."""
import os

import torch

from mae_fast.data import BuiltinImages
from mae_fast.train.loader import EpochBatches, build_loader

from test_pretrain import read_log, run_pretrain


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, key):
        index, sample_seed = key
        return torch.tensor([os.getpid(), index, sample_seed % 1000], dtype=torch.int64)


def test_workers_persist_across_epochs_and_batches_follow_the_epoch():
    batches = EpochBatches(_Pids(), batch_size=2, seed=0)
    loader = build_loader(_Pids(), batches, num_workers=1, device=torch.device("cpu"))
    seen = {}
    for epoch in range(3):
        batches.set_epoch(epoch, skip=1 if epoch == 2 else 0)
        seen[epoch] = torch.cat([b for b, _ in loader])  # (n, 3): pid, index, seed
    pids = {int(p) for e in seen.values() for p in e[:, 0]}
    assert len(pids) == 1 and pids != {os.getpid()}  # one worker process served all epochs
    assert len(seen[0]) == len(seen[1]) == 8 and len(seen[2]) == 6  # epoch 2 resumed after 1 batch
    assert not torch.equal(seen[0][:, 1], seen[1][:, 1])  # reshuffled per epoch
    # the same keys as the in-process loader
    batches0 = EpochBatches(_Pids(), batch_size=2, seed=0)
    batches0.set_epoch(1)
    inproc = torch.cat([b for b, _ in build_loader(_Pids(), batches0, num_workers=0, device=torch.device("cpu"))])
    torch.testing.assert_close(inproc[:, 1:], seen[1][:, 1:], rtol=0, atol=0)


def test_worker_pixels_equal_in_process_pixels():
    data = BuiltinImages(16, 8)
    out = []
    for workers in (0, 2):
        batches = EpochBatches(data, batch_size=4, seed=3)
        batches.set_epoch(1)
        out.append(torch.cat([b for b, _ in build_loader(data, batches, workers, torch.device("cpu"))]))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_kill_and_resume_with_workers_reproduces_the_in_process_run(tmp_path):
    extra = ["--save-every-steps", 2]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_pretrain(whole, *extra) == 0
    assert run_pretrain(killed, *extra, "--num-workers", 2, "--simulate-kill-after-steps", 7) == 137
    assert run_pretrain(killed, *extra, "--num-workers", 2, "--resume", "auto") == 0
    steps_whole, losses_whole = read_log(whole)
    steps_resumed, losses_resumed = read_log(killed)
    assert steps_resumed == steps_whole == list(range(8))
    torch.testing.assert_close(losses_resumed, losses_whole, rtol=0, atol=0)
