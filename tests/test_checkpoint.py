"""Training checkpoints between facebookresearch/mae and mae_fast, both directions.

The official side is re-created from the official code's logic (not vendored) in
``tests/_official_training.py``: ``util/misc.py`` ``save_model`` / ``load_model`` and timm's
``add_weight_decay`` as ``main_pretrain.py`` calls it. Tiny models (16 px images, 4 px patches)."""
import argparse
import os
import pickle

import pytest
import torch

import mae_fast
from mae_fast import checkpoint, lr_sched, pretrain

from _official_training import (TINY, official_add_weight_decay, official_args, official_load_model,  # noqa: F401
                                official_optimizer, official_run, official_save_model, train_steps)


def test_default_groups_are_the_official_ones():
    model = mae_fast.MaskedAutoencoderViT(**TINY)
    ours = lr_sched.param_groups_weight_decay(model, 0.05)
    theirs = official_add_weight_decay(model, 0.05)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in theirs]
    assert [g["weight_decay"] for g in ours] == [0.0, 0.05]
    names = dict(zip(map(id, model.parameters()), (n for n, _ in model.named_parameters())))
    decayed = {names[id(p)] for p in ours[1]["params"]}
    assert {"cls_token", "mask_token"} <= decayed  # the official pretraining decays the tokens
    # the earlier mae_fast choice stays available
    no_decay, _ = lr_sched.param_group_names(model, lr_sched.skip_list_for("no-decay-tokens"))
    assert {"cls_token", "mask_token"} <= set(no_decay)
    with pytest.raises(ValueError, match="unknown weight-decay recipe"):
        lr_sched.skip_list_for("timm")


def test_official_training_checkpoint_reads_weights_only(tmp_path):
    path, model, optimizer = official_run(tmp_path, epoch=3)
    ckpt = checkpoint.load_training_checkpoint(path)
    assert ckpt["format"] == "official" and ckpt["epoch"] == 3 and ckpt["step_in_epoch"] == 0
    assert ckpt["args"]["model"] == "mae_vit_large_patch16" and ckpt["args"]["blr"] == 1e-3
    assert ckpt["scaler"]["scale"] == 1024.0
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    sched = checkpoint.schedule_from_args(ckpt["args"])
    assert sched["warmup_epochs"] == 40 and sched["epochs"] == 400 and sched["lr"] is None
    # and load_official_checkpoint takes the training file as it is (the failing call)
    fresh = mae_fast.MaskedAutoencoderViT(**TINY)
    report = mae_fast.load_official_checkpoint(fresh, path)
    assert not report.missing_keys and not report.unexpected_keys


@pytest.mark.parametrize("recipe", ["official", "no-decay-tokens"])
def test_official_checkpoint_resumes_the_optimizer(tmp_path, recipe):
    path, model, optimizer = official_run(tmp_path)
    resumed = mae_fast.MaskedAutoencoderViT(**TINY, backend="reference")
    opt = torch.optim.AdamW(lr_sched.param_groups_weight_decay(resumed, 0.05, lr_sched.skip_list_for(recipe)),
                            lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    report = checkpoint.resume_training(path, resumed, opt, scaler)
    assert report.start_epoch == 4 and report.start_step == 0 and report.format == "official"
    assert scaler.get_scale() == 1024.0
    if recipe == "official":
        assert report.notes == []
    else:  # the tokens move from the decay to the no-decay group, their Adam moments with them
        assert len(report.notes) == 1 and "cls_token, mask_token changed group" in report.notes[0]
    by_name = dict(resumed.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            theirs, ours = optimizer.state[p], opt.state[by_name[name]]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(theirs[key], ours[key]), (name, key)
    if recipe == "official":  # then the next steps are the official run's next steps, bit for bit
        train_steps(model, optimizer, 2, seed=1)
        train_steps(resumed, opt, 2, seed=1)
        for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), k


def test_resume_across_models_says_why(tmp_path):
    path, _, _ = official_run(tmp_path)
    other = mae_fast.MaskedAutoencoderViT(**{**TINY, "depth": 3})
    opt = torch.optim.AdamW(lr_sched.param_groups_weight_decay(other, 0.05))
    with pytest.raises(ValueError, match=r"checkpoint-3.pth.*model keys differ.*blocks\.2"):
        checkpoint.resume_training(path, other, opt)
    # same parameter names, another optimizer layout (one group): no recipe explains it.
    # Counted by hand: a block has 8 no-decay (2 norms x 2, 4 biases) + 4 decay weights; outside
    # the 3 blocks 7 no-decay (patch_embed/decoder_embed/decoder_pred biases, 2 norms x 2) and 5
    # decay (patch_embed, cls_token, decoder_embed, mask_token, decoder_pred) -> 48 = [31, 17]
    ckpt = checkpoint.load_training_checkpoint(path)
    model = mae_fast.MaskedAutoencoderViT(**TINY)
    one_group = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    ckpt["optimizer"] = one_group.state_dict()
    opt = torch.optim.AdamW(lr_sched.param_groups_weight_decay(model, 0.05))
    with pytest.raises(ValueError, match=r"param groups of sizes \[48\].*'official': \[31, 17\]"):
        checkpoint.resume_training(ckpt, model, opt)


def test_mae_fast_checkpoint_resumes_in_the_official_loader(tmp_path):
    """`mae-fast pretrain` writes a checkpoint; the official misc.load_model (with the official
    optimizer groups and an enabled loss scaler) takes it unchanged."""
    out = tmp_path / "run"
    assert pretrain.main(["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4",
                          "--builtin-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--no-progress",
                          "--no-linprobe", "--num-preview", "1", "--device", "cpu", "--num-threads", "1",
                          "--output-dir", str(out)]) == 0
    path = str(out / "checkpoint-last.pth")
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    optimizer = official_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    args = official_args(resume=path)
    official_load_model(args, model, optimizer, scaler)
    assert args.start_epoch == 1
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert len(optimizer.state) == sum(p.requires_grad for p in model.parameters())
    assert checkpoint.load_training_checkpoint(path)["format"] == "mae_fast"


class _RunsCode:
    """Unpickling this would call os.system / create a file: a malicious checkpoint."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_runs_nothing(tmp_path):
    victim = tmp_path / "pwned"
    for i, payload in enumerate([
        {"model": {}, "optimizer": {}, "epoch": 0, "args": _RunsCode(str(victim))},
        {"model": {}, "args": argparse.Namespace(x=_RunsCode(str(victim)))},  # hidden inside a Namespace
        {"model": {}, "args": argparse.FileType("w")},  # another argparse class: not allowed either
    ]):
        path = tmp_path / f"evil{i}.pth"
        torch.save(payload, path)  # pickling records the callable; only unpickling would call it
        with pytest.raises(ValueError, match=f"evil{i}.pth.*weights-only"):
            checkpoint.read_checkpoint(path)
        with pytest.raises(ValueError, match="weights-only"):
            mae_fast.load_official_checkpoint(mae_fast.MaskedAutoencoderViT(**TINY), path)
        assert not victim.exists()
    # a plain pickle (not a torch zip) too
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"args": _RunsCode(str(victim))}, protocol=2))
    with pytest.raises(ValueError, match="weights-only"):
        checkpoint.read_checkpoint(path)
    assert not victim.exists()


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path, _, _ = official_run(tmp_path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth"):
        checkpoint.load_training_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        checkpoint.load_training_checkpoint(tmp_path / "nope.pth")
    weights = tmp_path / "weights.pth"
    torch.save({"model": mae_fast.MaskedAutoencoderViT(**TINY).state_dict()}, weights)
    with pytest.raises(ValueError, match=r"weights.pth.*no 'optimizer' entry"):
        checkpoint.load_training_checkpoint(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safetensors_in_and_out(tmp_path, dtype):
    pytest.importorskip("safetensors", reason="safetensors is in requirements-dev.txt; not installed here")
    model = mae_fast.MaskedAutoencoderViT(**TINY).to(dtype)
    path = tmp_path / "w.safetensors"
    checkpoint.save_state_dict(path, model.state_dict(), metadata={"model": "tiny", "input_size": 16})
    obj = checkpoint.read_checkpoint(path)
    assert obj["metadata"] == {"model": "tiny", "input_size": "16"}
    fresh = mae_fast.MaskedAutoencoderViT(**TINY).to(dtype)
    mae_fast.load_official_checkpoint(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == dtype, k
    with pytest.raises(ValueError, match="safetensors file: it holds weights only"):
        checkpoint.load_training_checkpoint(path)
    # truncated
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        checkpoint.read_checkpoint(cut)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 0})

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]
    assert checkpoint.read_checkpoint(path)["epoch"] == 0
    with pytest.raises(TypeError, match="key 'w' holds a str"):
        checkpoint.save_state_dict(tmp_path / "x.safetensors", {"w": "not a tensor"})
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]
