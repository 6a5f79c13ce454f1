"""The trainer and the probe on checkpoints of both worlds, through the command line:
``mae-fast pretrain --resume`` continues an official ``main_pretrain.py`` run (its schedule filling
the options not given), a resume across ``--weight-decay-recipe`` maps the Adam state or says why
it cannot, ``--save-format safetensors`` writes weights that ``mae-fast convert`` reads, and
``mae-fast linprobe`` takes official training checkpoints and .safetensors files.

The official checkpoints are made by the re-created official saving code in
``tests/_official_training.py``. Tiny models (16 px images, 4 px patches)."""
import argparse
import re

import pytest
import torch

from mae_fast import checkpoint, cli, convert, linprobe, lr_sched, pretrain
from mae_fast.train.state import save_weights

from _official_training import official_run

# the trainer's own model/size/batch are NOT given: they come from the official checkpoint
RUN = ["--builtin-size", "16", "--log-every", "1", "--num-preview", "0", "--no-progress", "--no-linprobe",
       "--device", "cpu", "--num-threads", "1"]
TINY = ["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4", "--epochs", "2",
        "--warmup-epochs", "1", *RUN]
# an official run's args, each unlike mae_vit_tiny_patch4's recipe defaults (32 px, batch 64,
# 10 epochs, warmup 1, blr 1e-2, min_lr 0, wd 0.05, mask 0.75), so a filled value is seen
OFFICIAL = dict(model="mae_vit_tiny_patch4", input_size=16, batch_size=4, epochs=3, warmup_epochs=2, blr=5e-3,
                lr=5e-3 * 4 / 256,  # main_pretrain.py stores the lr it computed from blr
                min_lr=1e-4, weight_decay=0.04, mask_ratio=0.6, accum_iter=1, seed=0, world_size=1)


def official_tiny_run(out_dir, epoch=0, **args):
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    return official_run(out_dir, epoch=epoch, mae=model, **{**OFFICIAL, **args})


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def adam_steps(optimizer_state):
    return {int(s["step"]) for s in optimizer_state["state"].values()}


# ---------------------------------------------------------------------------------------------
def test_official_checkpoint_resumes_via_the_cli_and_trains_on(tmp_path, capsys):
    path, model, optimizer = official_tiny_run(tmp_path / "official")  # checkpoint-0.pth: epoch 0 done
    out = tmp_path / "resumed"
    assert cli.main(["pretrain", "--resume", path, "--output-dir", str(out), *RUN]) == 0
    printed = capsys.readouterr().out
    assert "official checkpoint" in printed and "epochs=3" in printed and "warmup_epochs=2" in printed
    assert "'lr=" not in printed  # derived from blr: recomputed for this run's batch, not copied
    assert re.search(r"resumed from .*checkpoint-0.pth \(official checkpoint\): epoch 1, iteration 0 of 4", printed)
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 2  # epochs 1 and 2 ran: the official run's 3 epochs are done
    for key, value in OFFICIAL.items():
        if key != "seed":
            assert ckpt["args"][key] == pytest.approx(value), key
    # the official optimizer state went on: its 2 steps + 2 epochs x 4 iterations
    assert adam_steps(checkpoint.read_checkpoint(path)["optimizer"]) == {2}
    assert adam_steps(ckpt["optimizer"]) == {2 + 8}
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == \
        [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]


def test_options_given_win_over_the_official_schedule(tmp_path, capsys):
    path, _, _ = official_tiny_run(tmp_path / "official")
    out = tmp_path / "resumed"
    assert cli.main(["pretrain", "--resume", path, "--output-dir", str(out), "--epochs", "2",
                     "--mask-ratio", "0.75", *RUN]) == 0
    assert "epochs=3" not in capsys.readouterr().out
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and adam_steps(ckpt["optimizer"]) == {2 + 4}
    assert ckpt["args"]["mask_ratio"] == 0.75  # given, though it is the default: not the file's 0.6
    assert ckpt["args"]["warmup_epochs"] == 2  # not given: the file's


def test_schedule_from_official_lr_rules():
    def fill(saved, given=(), **ours):
        args = argparse.Namespace(**{**{k: None for k in OFFICIAL}, **ours})
        pretrain.schedule_from_official({"args": dict(OFFICIAL, **saved)}, args, frozenset(given))
        return args
    assert fill({}).lr is None and fill({}).blr == 5e-3  # derived lr: recomputed from blr here
    assert fill({"lr": 1e-3}).lr == 1e-3  # an lr the official user set is kept
    given = fill({"lr": 1e-3}, given={"blr"}, blr=2e-2)  # a given blr keeps both
    assert given.lr is None and given.blr == 2e-2


def test_bad_resume_files_are_usage_errors(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save({"model": pretrain.mae_vit_tiny_patch4(img_size=16).state_dict()}, weights)
    cut = tmp_path / "cut.pth"
    path, _, _ = official_tiny_run(tmp_path)
    cut.write_bytes(open(path, "rb").read()[:1000])
    for bad, message in [(weights, "no 'optimizer' entry"), (cut, "cut.pth"),
                         (tmp_path / "nope.pth", "does not exist")]:
        assert cli.main(["pretrain", *TINY, "--resume", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err + captured.out


# ---------------------------------------------------------------------------------------------
def test_resume_across_weight_decay_recipes_maps_the_adam_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", *TINY, "--epochs", "1", "--weight-decay-recipe", "no-decay-tokens",
                     "--output-dir", str(out)]) == 0
    before = load(out / "checkpoint-last.pth")
    capsys.readouterr()
    assert cli.main(["pretrain", *TINY, "--resume", "auto", "--output-dir", str(out)]) == 0  # default: official
    printed = capsys.readouterr().out
    assert "'no-decay-tokens' weight-decay groups" in printed and "cls_token, mask_token changed group" in printed
    after = load(out / "checkpoint-last.pth")
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    official = lr_sched.param_group_names(model)
    assert [len(g["params"]) for g in after["optimizer"]["param_groups"]] == [len(n) for n in official]
    assert [len(g["params"]) for g in before["optimizer"]["param_groups"]] == \
        [len(n) for n in lr_sched.param_group_names(model, lr_sched.skip_list_for("no-decay-tokens"))]
    assert adam_steps(after["optimizer"]) == {8}  # 4 + 4: the state went on, tokens included
    assert after["args"]["weight_decay_recipe"] == "official"


def test_resume_of_an_unexplained_optimizer_layout_says_why(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    ckpt = load(out / "checkpoint-last.pth")
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    ckpt["optimizer"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).state_dict()
    torch.save(ckpt, out / "one-group.pth")
    capsys.readouterr()
    assert cli.main(["pretrain", *TINY, "--resume", str(out / "one-group.pth"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "one-group.pth" in err and "No recipe explains the saved layout" in err and "'official': [" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
def test_save_format_safetensors_writes_weights_convert_reads(tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is in requirements-dev.txt; not installed here")
    out = tmp_path / "run"
    assert cli.main(["pretrain", *TINY, "--epochs", "1", "--save-format", "safetensors",
                     "--output-dir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-0.pth", "checkpoint-0.safetensors", "checkpoint-last.pth"]
    saved = load(out / "checkpoint-0.pth")["model"]
    meta = checkpoint.checkpoint_args(checkpoint.read_checkpoint(out / "checkpoint-0.safetensors"))
    assert meta["model"] == "mae_vit_tiny_patch4" and meta["input_size"] == 16 and meta["epoch"] == 0
    assert meta["embed_dim"] == 64 and meta["img_size"] == [16, 16]
    # `mae-fast convert` reads it (architecture from the metadata) and writes the same weights
    capsys.readouterr()
    assert cli.main(["convert", str(out / "checkpoint-0.safetensors"), str(tmp_path / "w.pth"), "--to",
                     "official"]) == 0
    assert "(safetensors) ->" in capsys.readouterr().out
    model, _ = convert.load_mae(tmp_path / "w.pth")
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert convert.architecture(model) == convert.architecture(pretrain.mae_vit_tiny_patch4(img_size=16))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["official", "safetensors"])
def test_linprobe_reads_official_and_safetensors_checkpoints(tmp_path, monkeypatch, capsys, kind):
    path, model, _ = official_tiny_run(tmp_path, seed=3)
    if kind == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors is in requirements-dev.txt; not installed here")
        st = str(tmp_path / "w.safetensors")
        save_weights(st, model, argparse.Namespace(model="mae_vit_tiny_patch4", input_size=16, mask_ratio=0.6), 0)
        path = st
    probed = {}

    def record(probe_model, model_name, input_size, seed, device, **kw):
        probed.update(model=probe_model, name=model_name, input_size=input_size, seed=seed)

    monkeypatch.setattr(linprobe, "compare_with_random_init", record)
    assert cli.main(["linprobe", "--checkpoint", path, "--device", "cpu"]) == 0, capsys.readouterr().err
    assert probed["name"] == "mae_vit_tiny_patch4" and probed["input_size"] == 16
    assert probed["seed"] == (3 if kind == "official" else 0)
    for k, v in model.state_dict().items():
        assert torch.equal(probed["model"].state_dict()[k], v), k


def test_linprobe_runs_on_an_official_training_checkpoint(tmp_path, capsys):
    path, _, _ = official_tiny_run(tmp_path)
    assert cli.main(["linprobe", "--checkpoint", path, "--device", "cpu"]) == 0
    accs = [float(a) for a in re.findall(r"encoder: +([0-9.]+)% accuracy", capsys.readouterr().out)]
    assert len(accs) == 2 and all(10.0 < a <= 100.0 for a in accs)
