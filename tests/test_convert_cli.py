"""``mae-fast convert SRC DST --to {official,hf,timm,safetensors}``: what it prints (mapped,
dropped, interpolated), the source format guessed or given, one clear error and nothing written
on bad input. Tiny models."""
import argparse
import os

import pytest
import torch

import mae_fast
from mae_fast import checkpoint, cli, convert

pytest.importorskip("safetensors", reason="safetensors is pinned in requirements-dev.txt")

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


@pytest.fixture
def official_ckpt(tmp_path):
    """An official-layout training checkpoint of a mae_fast tiny model (args name a known model)."""
    from mae_fast import pretrain
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    path = tmp_path / "checkpoint-3.pth"
    args = argparse.Namespace(model="mae_vit_tiny_patch4", input_size=16, norm_pix_loss=True, blr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 3, "scaler": {}, "args": args}, path)
    return path, model


def run(capsys, *argv):
    rc = cli.main(["convert", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_to_timm_prints_the_dropped_decoder(tmp_path, capsys, official_ckpt):
    src, model = official_ckpt
    rc, out, err = run(capsys, src, tmp_path / "enc.safetensors", "--to", "timm")
    assert rc == 0, err
    assert "(official) -> " in out and "mapped: 30 tensors" in out
    assert "dropped: 20 tensors: mask_token, decoder_pos_embed" in out and "decoder_blocks.* (12)" in out
    assert "interpolated: nothing" in out
    obj = checkpoint.read_checkpoint(tmp_path / "enc.safetensors")
    assert set(obj["model"]) == {k for k in model.state_dict() if not k.startswith(("decoder", "mask_token"))}
    # heads and eps came from the args' model name: the timm kwargs are right
    assert '"num_heads": 4' in obj["metadata"]["timm_kwargs"]


def test_to_hf_and_back_with_guessed_sources(tmp_path, capsys, official_ckpt):
    pytest.importorskip("transformers", reason="transformers is pinned in requirements-dev.txt")
    src, model = official_ckpt
    rc, out, err = run(capsys, src, tmp_path / "hf", "--to", "hf")
    assert rc == 0, err
    assert "q/k/v packed into / split from qkv in 6 attention weights+biases" in out
    rc, out, err = run(capsys, tmp_path / "hf", tmp_path / "w.safetensors", "--to", "safetensors")
    assert rc == 0 and "(hf) -> " in out, err
    rc, out, err = run(capsys, tmp_path / "w.safetensors", tmp_path / "w.pth", "--to", "official", "--img-size", "24")
    assert rc == 0 and "(safetensors) -> " in out, err
    assert "interpolated: pos_embed, decoder_pos_embed" in out
    back = mae_fast.MaskedAutoencoderViT(**{**ARCH, "img_size": 24, "embed_dim": 64, "num_heads": 4,
                                            "decoder_embed_dim": 32, "decoder_num_heads": 4, "mlp_ratio": 4.0,
                                            "depth": 2, "decoder_depth": 1})
    report = mae_fast.load_official_checkpoint(back, tmp_path / "w.pth")
    assert not report.missing_keys and not report.interpolated
    for k, v in model.state_dict().items():
        if "pos_embed" not in k:
            assert torch.equal(back.state_dict()[k], v), k


def test_from_timm_overrides_the_guess(tmp_path, capsys):
    enc = convert.to_timm(mae_fast.MaskedAutoencoderViT(**ARCH))
    enc["head.weight"] = torch.zeros(10, 32)  # a timm classifier head: dropped, reported
    torch.save(enc, tmp_path / "timm.pth")
    rc, out, err = run(capsys, tmp_path / "timm.pth", tmp_path / "mae.pth", "--to", "official", "--from", "timm",
                       "--num-heads", "4")
    assert rc == 0, err
    assert "dropped: 1 tensors: head.weight" in out and "decoder tensors not in the source keep their init" in out
    # without --from timm it is an official file without a decoder: refused, nothing written
    rc, out, err = run(capsys, tmp_path / "timm.pth", tmp_path / "x.pth", "--to", "official", "--num-heads", "4")
    assert rc == 2 and "timm.pth" in err and "decoder_embed.weight" in err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("case", ["truncated", "not_mae", "exists", "bad_target_suffix", "hf_overrides"])
def test_bad_input_one_error_nothing_written(tmp_path, capsys, official_ckpt, case):
    src, _ = official_ckpt
    dst = tmp_path / "out.safetensors"
    to = "safetensors"
    extra = []
    if case == "truncated":
        data = src.read_bytes()
        src = tmp_path / "cut.pth"
        src.write_bytes(data[: len(data) // 3])
        expect = "cut.pth"
    elif case == "not_mae":
        src = tmp_path / "other.pth"
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, src)
        expect = "other.pth' is not an MAE state_dict: no 'cls_token'"
    elif case == "exists":
        dst.write_bytes(b"keep me")
        expect = "exists"
    elif case == "bad_target_suffix":
        dst = tmp_path / "out.pth"
        expect = "writes a .safetensors file"
    else:
        os.makedirs(tmp_path / "hfdir")
        (tmp_path / "hfdir" / "config.json").write_text("{}")
        src, extra = tmp_path / "hfdir", ["--num-heads", "3"]
        expect = "--num-heads: not used with an HF source"
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run(capsys, src, dst, "--to", to, *extra)
    assert rc == 2 and out == ""
    assert err.startswith("mae-fast convert: error: ") and expect in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before
    if case == "exists":
        assert dst.read_bytes() == b"keep me"
