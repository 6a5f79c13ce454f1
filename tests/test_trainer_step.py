"""mae_fast.train.step: one iteration without a host read. A non-finite loss or gradient makes the
update a no-op (fused and for-each AdamW), is counted on the device, and stops the run after
--max-bad-steps in a row keeping the last good checkpoint; fused AdamW equals for-each AdamW."""
import argparse
import csv
import math
import os

import pytest
import torch

from mae_fast import pretrain
from mae_fast.train.step import NonFiniteSteps, TrainStep, build_optimizer, fused_adamw_supported

TINY = ["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4", "--builtin-size", "16",
        "--epochs", "2", "--warmup-epochs", "1", "--log-every", "1", "--num-preview", "0",
        "--no-progress", "--no-linprobe", "--device", "cpu", "--num-threads", "1"]


def _args(**kw):
    base = dict(lr=1e-2, weight_decay=0.05, accum_iter=1, clip_grad=None, mask_ratio=0.75, fused_adamw=None,
                min_lr=0.0, warmup_epochs=0, epochs=1)
    base.update(kw)
    return argparse.Namespace(**base)


def _step_setup(fused, **kw):
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    args = _args(fused_adamw=fused, **kw)
    opt = build_optimizer(model, args, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, TrainStep(model, opt, scaler, None, torch.device("cpu"), args, distributed=False)


def _snapshot(model, opt):
    state = [t.clone() for p in model.parameters() for t in opt.state.get(p, {}).values()]
    return [p.detach().clone() for p in model.parameters()], state


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, 16, generator=g)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("first", [True, False])  # a bad first update: AdamW has no state yet
def test_a_non_finite_step_is_a_no_op_and_counted(fused, first):
    model, opt, step = _step_setup(fused)
    assert step.fused == fused
    it = 0
    if not first:
        step(*_batch(0), it=0, step=0)
        it = 1
    params, state = _snapshot(model, opt)
    imgs, noise = _batch(1)
    step(torch.full_like(imgs, float("nan")), noise, it=it, step=it)
    params_after, state_after = _snapshot(model, opt)
    for a, b in zip(params, params_after):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    if first:  # the state a skipped first update leaves is the one AdamW starts from: zeros, step 0
        assert state_after and all(torch.count_nonzero(v) == 0 for v in state_after)
    else:
        assert len(state_after) == len(state) == 3 * sum(p.requires_grad for p in model.parameters())
        for a, b in zip(state, state_after):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert step.bad_steps() == (1, 1, it)
    assert int(step.window_n) == (0 if first else 1)  # the NaN loss is not averaged in
    assert math.isnan(step.read_window()) == first
    # a good update afterwards moves the weights again and does not count as bad
    step(*_batch(2), it=it + 1, step=it + 1)
    before = dict(zip([n for n, _ in model.named_parameters()], params_after))
    assert not torch.equal(model.decoder_pred.weight.detach(), before["decoder_pred.weight"])
    assert step.bad_steps() == (1, 1, it)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped():
    model, opt, step = _step_setup(True)
    params, _ = _snapshot(model, opt)
    model.decoder_pred.weight.register_hook(lambda g: g * float("inf"))
    step(*_batch(0), it=0, step=0)
    for a, b in zip(params, _snapshot(model, opt)[0]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert step.bad_steps()[0] == 1


def test_bad_step_counters_track_the_longest_streak():
    c = NonFiniteSteps("cpu")
    for step, bad in enumerate([0, 1, 1, 0, 1, 1, 1, 0, 1]):
        c.record(torch.tensor(float(bad)), step)
    assert (int(c.total), int(c.longest), int(c.longest_start)) == (6, 3, 4)


@pytest.mark.skipif(not fused_adamw_supported(torch.device("cpu")), reason="no fused AdamW on CPU here")
def test_fused_adamw_equals_foreach():
    """Five updates with --fused-adamw and --no-fused-adamw: the same weights within fp32 rounding."""
    results = []
    for fused in (True, False):
        model, opt, step = _step_setup(fused, clip_grad=1.0)
        for i in range(5):
            step(*_batch(i), it=i, step=i)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, a in results[0].items():
        b = results[1][name]
        if name.endswith("attn.qkv.bias"):
            # the key bias has an exactly zero gradient (softmax ignores a shift shared by all keys):
            # Adam normalises its rounding noise to steps of ~lr, so it is left out
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _log(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_injected_nan_steps_are_skipped_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(out), "--simulate-nan-at-steps", "2,5,6"]) == 0
    rows = _log(out)
    assert [int(r["bad_steps"]) for r in rows] == [0, 0, 1, 1, 1, 2, 3, 3]
    assert [r["loss"] for r in rows if r["step"] in ("2", "5", "6")] == ["nan"] * 3  # no finite loss to average
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "3 non-finite updates skipped so far" in capsys.readouterr().out


def test_too_many_bad_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert pretrain.main(TINY + ["--output-dir", str(good), "--save-freq", "1"]) == 0
    rc = pretrain.main(TINY + ["--output-dir", str(bad), "--simulate-nan-at-steps", "4,5,6",
                               "--max-bad-steps", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "2 consecutive updates had a non-finite loss or gradient (the first at global iteration 4" in err
    assert "Last good checkpoint:" in err and "end of epoch 1" in err and "Traceback" not in err
    kept = torch.load(bad / "checkpoint-last.pth", weights_only=True)
    first_epoch = torch.load(good / "checkpoint-0.pth", weights_only=True)
    assert kept["epoch"] == 0 and kept["step_in_epoch"] == 0
    for k, v in first_epoch["model"].items():
        torch.testing.assert_close(kept["model"][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("flag, fused", [([], None), (["--fused-adamw"], True), (["--no-fused-adamw"], False)])
def test_fused_adamw_flag(tmp_path, capsys, flag, fused):
    out = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(out), "--epochs", "1", *flag]) == 0
    groups = torch.load(out / "checkpoint-last.pth", weights_only=True)["optimizer"]["param_groups"]
    expect = fused_adamw_supported(torch.device("cpu")) if fused is None else fused
    assert all(bool(g["fused"]) == expect for g in groups)
    assert ("fused AdamW" if expect else "for-each AdamW") in capsys.readouterr().out
