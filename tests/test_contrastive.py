"""mae_fast.ContrastiveMAE (CAN-style InfoNCE + MAE) and ``mae-fast pretrain --contrastive-weight``.

* the NT-Xent loss against a plain-loop float64 reference (value and gradient), and gradcheck;
* the two-view forward: weight 0 is the plain model's reconstruction loss on both views, the
  contrastive term is the reference loss of the projected mean-pooled visible tokens, 4-D input is
  the plain MAE forward bit for bit;
* 2-process gloo DDP: the mean of the ranks' losses and the DDP gradients equal one process on the
  global batch (negatives all-gathered with gradient);
* the two-view data set, the trainer (log columns, header, checkpoint keys), load_official_checkpoint
  on a contrastive checkpoint, bad arguments.
Tiny models (32 px, 8 px patches, width 32, depth 1) and 16 px trainer runs."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from _contrastive_case import TINY, global_batch, tiny_contrastive_model, tiny_plain_model
from mae_fast import ContrastiveMAE, load_official_checkpoint, pretrain
from mae_fast.contrastive import nt_xent
from mae_fast.data import BuiltinImages
from mae_fast.train.views import TwoViews

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# the loss
def nt_xent_loop(z_a, z_b, temperature):
    """SimCLR's NT-Xent written out: the 2n vectors, each an anchor; positive = the other view of
    its image; denominator = every vector but the anchor itself."""
    n = z_a.shape[0]
    vecs = [z_a[i] for i in range(n)] + [z_b[i] for i in range(n)]
    vecs = [v / torch.sqrt((v * v).sum()) for v in vecs]
    total = 0.0
    for a in range(2 * n):
        pos = a + n if a < n else a - n
        sims = {k: (vecs[a] * vecs[k]).sum() / temperature for k in range(2 * n) if k != a}
        denom = sum(torch.exp(s) for s in sims.values())
        total = total - (sims[pos] - torch.log(denom))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_nt_xent_matches_the_loop_reference_in_float64(temperature):
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    z_b = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    got = nt_xent(z_a, z_b, temperature)
    want = nt_xent_loop(z_a, z_b, temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads_got = torch.autograd.grad(got, (z_a, z_b))
    grads_want = torch.autograd.grad(want, (z_a, z_b))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the analytic gradient against finite differences (smaller: gradcheck is n*P passes)
    if temperature == 0.1:
        a, b = z_a[:3, :4].detach().requires_grad_(), z_b[:3, :4].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, temperature), (a, b))


def test_nt_xent_is_low_for_matching_views_and_checks_its_input():
    z = torch.randn(4, 8, dtype=torch.float64)
    # identical views, 3 random negatives each: far below the loss of unrelated views, log(2n - 1)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(4, 8, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="must both be"):
        nt_xent(z, z[:3])
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, 0.0)


# ---------------------------------------------------------------------------------------------
# the model
def test_weight_zero_is_the_plain_reconstruction_loss_of_both_views():
    plain = tiny_plain_model()
    model = ContrastiveMAE.from_mae(plain, contrastive_weight=0.0)
    imgs, noise = global_batch(3)
    out = model(imgs, mask_ratio=0.5, noise=noise)
    per_view = [plain(imgs[:, v], mask_ratio=0.5, noise=noise[:, v]) for v in range(2)]
    want = (per_view[0][0] + per_view[1][0]) / 2
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.loss_rec, want)
    for v in range(2):
        torch.testing.assert_close(out.pred[:, v], per_view[v][1])
        torch.testing.assert_close(out.mask[:, v], per_view[v][2])
    assert out.pred.shape == (3, 2, 16, 8 * 8 * 3) and out.mask.shape == (3, 2, 16)
    assert (out.mask.sum(-1) == 8).all()  # CAN's 50 % per view: the default of a two-view call
    out_default = model(imgs, noise=noise)
    torch.testing.assert_close(out_default.loss, out.loss)


def test_contrastive_term_is_the_loss_of_the_projected_mean_pooled_visible_tokens():
    model = tiny_contrastive_model(contrastive_weight=0.3, reconstruction_weight=0.6, temperature=0.2)
    model.double()
    imgs, noise = global_batch(4)
    imgs = imgs.double()
    out = model(imgs, mask_ratio=0.5, noise=noise)
    feats = []
    for v in range(2):  # each view on its own through the encoder
        latent, _, _ = model.forward_encoder(imgs[:, v], 0.5, noise[:, v])  # (4, 1 + 8, 32)
        assert latent.shape[1] == 1 + 8
        feats.append(model.contrastive_head(latent[:, 1:].mean(dim=1)))  # cls token left out
    want_con = nt_xent_loop(feats[0], feats[1], 0.2)
    torch.testing.assert_close(out.loss_con, want_con)
    torch.testing.assert_close(out.loss, 0.6 * out.loss_rec + 0.3 * want_con)


def test_four_d_input_is_the_plain_forward_bit_for_bit():
    plain = tiny_plain_model()
    model = ContrastiveMAE.from_mae(plain)
    imgs, noise = global_batch(3)
    for ratio in (None, 0.6):
        got = model(imgs[:, 0], ratio, noise[:, 0]) if ratio else model(imgs[:, 0], noise=noise[:, 0])
        want = plain(imgs[:, 0], ratio or 0.75, noise[:, 0])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_from_mae_keeps_the_weights_and_adds_only_the_head():
    plain = tiny_plain_model()
    model = ContrastiveMAE.from_mae(plain)
    own, theirs = model.state_dict(), plain.state_dict()
    assert sorted(k for k in own if k not in theirs) == [
        "contrastive_head.0.bias", "contrastive_head.0.weight", "contrastive_head.2.bias", "contrastive_head.2.weight"]
    for k, v in theirs.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    assert model.contrastive_head[0].weight.shape == (32, 32) and model.contrastive_head[2].weight.shape == (128, 32)
    assert model.contrastive_weight == 0.03 and model.reconstruction_weight == 0.97 and model.temperature == 0.1


def test_bad_contrastive_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="contrastive_weight"):
        ContrastiveMAE(**TINY, contrastive_weight=-0.1)
    with pytest.raises(ValueError, match="reconstruction_weight"):
        ContrastiveMAE(**TINY, contrastive_weight=2.0)  # 1 - 2 < 0
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveMAE(**TINY, temperature=0)
    model = tiny_contrastive_model()
    imgs, noise = global_batch(2)
    with pytest.raises(ValueError, match=r"\(N, 2, C, H, W\)"):
        model.forward_two_views(imgs[:, :1], 0.5)
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        model(imgs, noise=noise[:, 0])


def test_checkpoint_round_trip_and_the_official_loader_ignores_the_head(tmp_path):
    model = tiny_contrastive_model(seed=3)
    path = tmp_path / "c.pth"
    torch.save({"model": model.state_dict()}, path)
    again = tiny_contrastive_model(seed=4)
    report = load_official_checkpoint(again, str(path))
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.ignored_keys == []
    imgs, noise = global_batch(2)
    for a, b in zip(model(imgs, noise=noise), again(imgs, noise=noise)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = tiny_plain_model(seed=5)
    report = load_official_checkpoint(plain, str(path))
    assert report.ignored_keys == sorted(k for k in model.state_dict() if k.startswith("contrastive_head."))
    assert report.missing_keys == [] and report.unexpected_keys == []
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)
    # mae-fast convert's reader: a plain model, the projector in its report's dropped keys
    from mae_fast import convert
    converted, conv_report = convert.load_mae(str(path), num_heads=2, decoder_num_heads=2)
    assert type(converted).__name__ == "MaskedAutoencoderViT" and conv_report.dropped == report.ignored_keys
    # official weights (no head) into a ContrastiveMAE: the head keeps its init, reported missing
    torch.save({"model": plain.state_dict()}, tmp_path / "p.pth")
    report = load_official_checkpoint(again, str(tmp_path / "p.pth"))
    assert report.missing_keys == sorted(k for k in model.state_dict() if k.startswith("contrastive_head."))


# ---------------------------------------------------------------------------------------------
# DDP: the global batch across 2 gloo processes
def test_two_process_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path):
    world = 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_contrastive_ddp.py"), str(r), str(world),
                               str(init), str(tmp_path / f"rank{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    model = tiny_contrastive_model()
    imgs, noise = global_batch()
    want = model(imgs, noise=noise)
    want.loss.backward()
    for key in ("loss", "loss_rec", "loss_con"):
        got = sum(r[key] for r in ranks) / world
        torch.testing.assert_close(got, getattr(want, key).detach(), rtol=1e-5, atol=1e-6, msg=key)
    # the contrastive term really differs per rank (each scores its own anchors against all)
    assert not torch.allclose(ranks[0]["loss_con"], ranks[1]["loss_con"])
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"])
    for k, g in grads.items():
        for r in ranks:  # DDP leaves the averaged gradient on every rank
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert grads["contrastive_head.2.weight"].abs().max() > 0


# ---------------------------------------------------------------------------------------------
# data and trainer
def test_two_views_data_set():
    base = BuiltinImages(16, 8)
    views = TwoViews(base)
    x, bad = views.load((3, 12345))
    assert x.shape == (2, 3, 16, 16) and bad == ()
    torch.testing.assert_close(x[0], base[(3, 12345)], rtol=0, atol=0)  # view 0: the plain run's sample
    assert not torch.equal(x[0], x[1])
    torch.testing.assert_close(views.load((3, 12345))[0], x, rtol=0, atol=0)  # a function of the key
    torch.testing.assert_close(views.load(2)[0], base[2], rtol=0, atol=0)  # int: the eval view
    assert len(views) == 8 and views.photo_names == base.photo_names


TINY_RUN = ["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4", "--builtin-size", "8",
            "--epochs", "1", "--warmup-epochs", "1", "--log-every", "1", "--num-preview", "2", "--knn-every", "0",
            "--no-progress", "--no-linprobe", "--device", "cpu", "--num-threads", "1"]


def test_pretrain_with_contrastive_weight(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(TINY_RUN + ["--output-dir", str(out), "--contrastive-weight", "0.03"]) == 0
    printed = capsys.readouterr().out
    assert "contrastive (CAN-style" in printed and "0.97 x reconstruction + 0.03 x InfoNCE" in printed
    assert "mask 0.5," in printed and "two views per sample" in printed and "6 negatives per anchor" in printed
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        rec, con, loss = float(r["loss_rec"]), float(r["loss_con"]), float(r["loss"])
        assert rec > 0 and con > 0
        assert math.isclose(loss, 0.97 * rec + 0.03 * con, rel_tol=1e-4)
    # the NT-Xent of 4 images (7 candidates per anchor) starts near log(7)
    assert 0.5 * math.log(7) < float(rows[0]["loss_con"]) < 2 * math.log(7)
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["contrastive_weight"] == 0.03 and ckpt["args"]["mask_ratio"] == 0.5
    head = sorted(k for k in ckpt["model"] if k.startswith("contrastive_head."))
    assert len(head) == 4
    plain = pretrain.mae_vit_tiny_patch4(img_size=16)
    report = load_official_checkpoint(plain, str(out / "checkpoint-last.pth"))
    assert report.ignored_keys == head and report.unexpected_keys == [] and report.missing_keys == []
    assert (out / "recon-epoch000.png").exists()
    # resume: the model is rebuilt as a ContrastiveMAE, so the keys match
    assert pretrain.main(TINY_RUN + ["--output-dir", str(out), "--contrastive-weight", "0.03", "--epochs", "2",
                                     "--resume", "auto"]) == 0


def test_plain_run_has_no_contrastive_columns(tmp_path):
    out = tmp_path / "run"
    assert pretrain.main(TINY_RUN + ["--output-dir", str(out), "--num-preview", "0"]) == 0
    with open(out / "log.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "loss_rec" not in header and "loss_con" not in header
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["mask_ratio"] == 0.75 and not any(k.startswith("contrastive") for k in ckpt["model"])


@pytest.mark.parametrize("extra, message", [
    (["--contrastive-weight", "-1"], "--contrastive-weight must be >= 0"),
    (["--contrastive-weight", "2"], "give --reconstruction-weight"),
    (["--contrastive-weight", "0.1", "--contrastive-temperature", "0"], "--contrastive-temperature must be > 0"),
])
def test_bad_contrastive_flags(tmp_path, capsys, extra, message):
    assert pretrain.main(TINY_RUN + ["--output-dir", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_with_the_wrong_contrastive_setting_says_which_flag():
    """A contrastive checkpoint resumed by a plain run (and the reverse) names the flag to use,
    not only the differing keys."""
    from mae_fast import checkpoint
    contrastive, plain = tiny_contrastive_model(), tiny_plain_model()
    written = {"model": contrastive.state_dict(), "optimizer": {}, "epoch": 0,
               "args": {"contrastive_weight": 0.03}}
    opt = torch.optim.AdamW(plain.parameters())
    with pytest.raises(ValueError, match=r"unexpected \['contrastive_head.*resume it with "
                                         r"--contrastive-weight 0.03"):
        checkpoint.resume_training(written, plain, opt)
    written = {"model": plain.state_dict(), "optimizer": {}, "epoch": 0, "args": {}}
    opt = torch.optim.AdamW(contrastive.parameters())
    with pytest.raises(ValueError, match=r"missing \['contrastive_head.*resume it without --contrastive-weight"):
        checkpoint.resume_training(written, contrastive, opt)
