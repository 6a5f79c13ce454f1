"""``mae-fast pretrain`` / ``linprobe``: the training loop on built-in data and on an ImageFolder,
2-process gloo DDP, kill-and-resume reproducing the uninterrupted losses, checkpoints the
official loader reads, reconstruction pictures, the recipe (lr schedule, weight-decay groups,
augmentation) and clear errors for bad arguments. Tiny models (16 px images, 4 px patches)."""
import csv
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import load_official_checkpoint, reference
from mae_fast import cli, linprobe, lr_sched, pretrain
from mae_fast.data import IMAGENET_DEFAULT_MEAN, TrainTransform, random_resized_crop_box
from mae_fast.visualize import reconstruction_panels

# 16 px images, 4 px patches: L = 16, 4 kept; 16 built-in samples / batch 4 = 4 iterations an epoch
TINY = ["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4", "--builtin-size", "16",
        "--epochs", "2", "--warmup-epochs", "1", "--log-every", "1", "--num-preview", "2",
        "--no-progress", "--no-linprobe", "--device", "cpu", "--num-threads", "1"]


def run_pretrain(out_dir, *extra):
    return pretrain.main(TINY + ["--output-dir", str(out_dir), *map(str, extra)])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]  # training rows (kNN rows have no loss)
    return [int(r["step"]) for r in rows], torch.tensor([float(r["loss"]) for r in rows], dtype=torch.float64)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
def test_few_steps_on_builtin_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretrain(out) == 0
    steps, losses = read_log(out)
    assert steps == list(range(8))  # 2 epochs x 4 iterations, one row each
    assert torch.isfinite(losses).all() and (losses > 0).all()
    for name in ("checkpoint-last.pth", "checkpoint-1.pth", "recon-epoch000.png", "recon-epoch001.png"):
        assert (out / name).exists(), name
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary file left behind
    # 2 images of 16 px, upscaled x3 = 48 px cells, 3 panels, 2 px padding around every cell
    with Image.open(out / "recon-epoch001.png") as img:
        assert img.size == (3 * 48 + 4 * 2, 2 * 48 + 3 * 2)
        assert img.mode == "RGB"
    printed = capsys.readouterr().out
    assert "epoch 2/2: loss" in printed and "img/s" in printed


def test_checkpoint_is_official_format_and_weights_only(tmp_path):
    out = tmp_path / "run"
    assert run_pretrain(out, "--epochs", 1) == 0
    ckpt = load_ckpt(out / "checkpoint-last.pth")  # weights_only: no arbitrary object inside
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] == 0
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "mae_vit_tiny_patch4"
    # the official loader calls GradScaler.load_state_dict(ckpt["scaler"]): it must accept ours
    torch.amp.GradScaler("cpu").load_state_dict(ckpt["scaler"])
    # the recipe: AdamW(0.9, 0.95), two weight-decay groups, lr = blr * 4 / 256 at the end of warmup
    groups = ckpt["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert ckpt["args"]["lr"] == pytest.approx(1e-2 * 4 / 256)

    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    report = load_official_checkpoint(model, str(out / "checkpoint-last.pth"))
    assert report.missing_keys == [] and report.unexpected_keys == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("kill_after, extra", [
    (5, []),  # killed in epoch 2 before any mid-epoch checkpoint: resume from the end of epoch 1
    (7, []),  # killed after the mid-epoch checkpoint at iteration 2 of epoch 2
    (7, ["--accum-iter", 2, "--norm-pix-loss"]),
])
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, kill_after, extra):
    extra = ["--save-every-steps", 2, *extra]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_pretrain(whole, *extra) == 0
    assert run_pretrain(killed, *extra, "--simulate-kill-after-steps", kill_after) == 137
    ckpt = load_ckpt(killed / "checkpoint-last.pth")
    done = (ckpt["epoch"] + 1) * 4 + ckpt["step_in_epoch"]
    assert done == (4 if kill_after == 5 else 6)  # what the killed run had saved
    assert run_pretrain(killed, *extra, "--resume", "auto") == 0

    steps_whole, losses_whole = read_log(whole)
    steps_resumed, losses_resumed = read_log(killed)
    assert steps_resumed == steps_whole == list(range(8))
    torch.testing.assert_close(losses_resumed, losses_whole, rtol=0, atol=0)
    a, b = load_ckpt(whole / "checkpoint-last.pth"), load_ckpt(killed / "checkpoint-last.pth")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_runs_and_fp16_keeps_its_grad_scaler(tmp_path, amp):
    out = tmp_path / amp
    assert run_pretrain(out, "--epochs", 1, "--amp", amp) == 0
    steps, losses = read_log(out)
    assert steps == [0, 1, 2, 3] and torch.isfinite(losses).all()
    scaler = load_ckpt(out / "checkpoint-last.pth")["scaler"]
    # fp16: the live scaler's state (4 finite steps counted towards growth); bf16: a fresh one
    assert scaler["_growth_tracker"] == (4 if amp == "fp16" else 0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    pretrain.save_checkpoint(path, {"epoch": 0, "model": {"w": torch.ones(2)}})

    def broken_save(obj, f):  # the trainer writes through mae_fast.checkpoint: a temporary path
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain.save_checkpoint(path, {"epoch": 1, "model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert load_ckpt(path)["epoch"] == 0  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def _two_rank_reference(steps, blr, builtin_size=32):
    """What 2-process DDP must compute, written out in one process: rank r's DistributedSampler
    shard, its augmentation and mask seeds, the mean of the two ranks' gradients, AdamW."""
    from mae_fast.data import BuiltinImages
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    dataset = BuiltinImages(16, builtin_size)
    optimizer = torch.optim.AdamW(lr_sched.param_groups_weight_decay(model, 0.05), betas=(0.9, 0.95))
    shards = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(dataset, 2, rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    steps_per_epoch = len(shards[0]) // 4
    for step in range(steps):
        lr_sched.adjust_learning_rate(optimizer, step / steps_per_epoch, blr * 8 / 256, 0.0, 1, 1)
        optimizer.zero_grad()
        for rank in range(2):
            idx = shards[rank][step * 4:(step + 1) * 4]
            imgs = torch.stack([dataset[(i, pretrain.sample_seed(0, 0, i))] for i in idx])
            noise = pretrain.mask_noise(0, rank, step, 4, 16, "cpu")
            loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
            (loss / 2).backward()  # DDP averages the ranks' gradients
        optimizer.step()
    return model.state_dict()


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mae_fast.pretrain", *TINY, "--epochs", "1", "--builtin-size", "32", "--blr", "0.5",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1: loss") == 1  # rank 0 logs, rank 1 does not
    assert "2 process(es)" in proc.stdout
    steps, losses = read_log(out)
    assert steps == [0, 1, 2, 3]  # 32 samples / (2 processes x batch 4)
    assert torch.isfinite(losses).all()
    ckpt = load_ckpt(out / "checkpoint-last.pth")
    assert ckpt["args"]["world_size"] == 2 and ckpt["args"]["eff_batch_size"] == 8
    assert ckpt["args"]["lr"] == pytest.approx(0.5 * 8 / 256)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved without the DDP wrapper
    # the 4 DDP steps moved the weights exactly as averaged gradients over both shards would
    expected = _two_rank_reference(4, 0.5)
    for k, v in expected.items():
        got = ckpt["model"][k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has an exactly zero gradient (softmax ignores a shift shared by all
            # keys): Adam normalises its rounding noise to steps of ~lr, so it is left out
            d = v.shape[0] // 3
            got, v = torch.cat([got[:d], got[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _write_image_folder(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path / "data" / "train")  # ImageNet layout: root/train/<class>/<image>
    out = tmp_path / "run"
    assert run_pretrain(out, "--data-path", tmp_path / "data", "--epochs", 1, "--batch-size", 2) == 0
    steps, losses = read_log(out)
    assert steps == [0, 1, 2] and torch.isfinite(losses).all()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--data-path", "/no/such/folder"], "does not exist"),
    (["--data-path", "EMPTY"], "holds no images"),
    (["--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
    (["--mask-ratio", "-0.1"], "--mask-ratio must be in [0, 1)"),
    (["--model", "mae_vit_nope"], "unknown --model 'mae_vit_nope'"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--batch-size", "64"], "no full batch of 64"),
    (["--input-size", "18"], "not a multiple of patch_size"),
    (["--resume", "/no/such/checkpoint.pth"], "does not exist"),
    (["--save-every-steps", "3", "--accum-iter", "2"], "must be a multiple of --accum-iter"),
    (["--epochs", "two"], "invalid int value"),
])
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in args]
    rc = cli.main(["pretrain", *TINY, "--output-dir", str(tmp_path / "run"), *args])
    captured = capsys.readouterr()
    assert rc == 2
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_help_exits_zero(capsys):
    assert pretrain.main(["--help"]) == 0
    assert "--mask-ratio" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
def test_lr_schedule_is_warmup_then_half_cycle_cosine():
    lr, min_lr, warmup, epochs = 1e-3, 1e-5, 2, 10
    def f(e):
        return lr_sched.learning_rate(e, lr, min_lr, warmup, epochs)
    assert f(0) == 0.0
    assert f(1) == pytest.approx(5e-4)  # half-way through warmup
    assert f(2) == pytest.approx(1e-3)  # peak
    assert f(6) == pytest.approx((1e-3 + 1e-5) / 2)  # cos(pi/2) = 0: half-way down
    assert f(2 + 8 / 3) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.75)  # cos(pi/3) = 1/2
    assert f(10) == pytest.approx(1e-5)


def test_weight_decay_groups():
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    no_decay, decay = lr_sched.param_groups_weight_decay(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= decay_names
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert "pos_embed" not in no_decay_names | decay_names  # frozen
    assert len(no_decay_names | decay_names) == sum(p.requires_grad for p in model.parameters())


def test_random_resized_crop_stays_inside_and_in_scale():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        left, top, w, h = random_resized_crop_box(300, 200, rng, scale=(0.2, 1.0))
        assert 0 <= left and 0 <= top and left + w <= 300 and top + h <= 200
        assert 0.2 * 0.9 <= w * h / (300 * 200) <= 1.0  # rounding of w and h aside


def test_train_transform_normalises_and_is_seeded():
    img = Image.new("RGB", (40, 30), (255, 128, 0))
    x = TrainTransform(8)(img, sample_seed=1)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    torch.testing.assert_close(x[:, 4, 4], torch.tensor(expected), rtol=0, atol=1e-5)

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    t = TrainTransform(8)
    torch.testing.assert_close(t(photo, 5), t(photo, 5), rtol=0, atol=0)
    assert not torch.equal(t(photo, 5), t(photo, 6))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_panels_paste_and_unnormalise(norm_pix_loss):
    """A model that predicts its target exactly must show the original image in panel 2."""
    model = pretrain.mae_vit_tiny_patch4(img_size=16, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 16, 16)

    class PerfectPredictor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_pix_loss = norm_pix_loss
            self.patchify, self.unpatchify = model.patchify, model.unpatchify

        def forward(self, x, mask_ratio, noise):
            target = reference.patchify(x, 4)  # (N, 16, 48)
            if norm_pix_loss:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                target = (target - mean) / (var + 1e-6) ** 0.5
            mask = (noise > 0.5).float()
            return None, target, mask

    noise = torch.rand(2, 16)
    masked, pasted, original = reconstruction_panels(PerfectPredictor(), imgs, 0.75, noise)
    torch.testing.assert_close(pasted, original, rtol=0, atol=1e-5)
    # removed patches show the mean colour (0 in normalised space), kept ones the image
    removed = reference.unpatchify((noise > 0.5).float().unsqueeze(-1).expand(2, 16, 48), 4, (4, 4), 3)
    mean_colour = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1).expand_as(masked)
    torch.testing.assert_close(masked[removed == 1], mean_colour[removed == 1])
    torch.testing.assert_close(masked[removed == 0], original[removed == 0])


# ---------------------------------------------------------------------------------------------
def test_linprobe_cli_prints_pretrained_and_random(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretrain(out, "--epochs", 1) == 0
    capsys.readouterr()
    assert cli.main(["linprobe", "--checkpoint", str(out / "checkpoint-last.pth"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    accs = [float(a) for a in re.findall(r"encoder: +([0-9.]+)% accuracy", printed)]
    assert len(accs) == 2 and all(10.0 < a <= 100.0 for a in accs)  # 10 classes: chance is 10%


def test_linprobe_random_init_is_the_seeded_init():
    torch.manual_seed(3)
    fresh = pretrain.mae_vit_tiny_patch4(img_size=16)
    lines = []
    accs = linprobe.compare_with_random_init(fresh, "mae_vit_tiny_patch4", 16, 3, torch.device("cpu"),
                                             out=lines.append)
    assert accs["pretrained"] == accs["random_init"]  # same weights, same features, same probe
    assert len(lines) == 3 and math.isfinite(accs["pretrained"])


def test_linprobe_bad_checkpoint(tmp_path, capsys):
    assert linprobe.main(["--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
