"""mae_fast.convert: Hugging Face ViTMAE and timm VisionTransformer in and out, official / mae_fast
.pth and safetensors, bad input. The HF and timm sides are the real packages (pinned in
requirements-dev.txt); tiny configs, no download. Equal outputs for the same ``noise``."""
import argparse
import json
import os
import sys

import pytest
import torch

import mae_fast
from mae_fast import checkpoint, convert

transformers = pytest.importorskip("transformers", reason="transformers is pinned in requirements-dev.txt")
pytest.importorskip("safetensors", reason="safetensors is pinned in requirements-dev.txt")

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def hf_model(in_chans=3, dtype=torch.float64, norm_pix_loss=True, **kw):
    """A tiny HF ViTMAEForPreTraining with non-trivial weights (init + noise on every tensor)."""
    cfg = transformers.ViTMAEConfig(
        image_size=16, patch_size=4, num_channels=in_chans, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32, layer_norm_eps=1e-6,
        norm_pix_loss=norm_pix_loss, mask_ratio=0.75, **kw)
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def mae_model(in_chans=3, dtype=torch.float64, **kw):
    torch.manual_seed(1)
    model = mae_fast.MaskedAutoencoderViT(**{**ARCH, **kw}, in_chans=in_chans, norm_pix_loss=True,
                                          norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                                          backend="reference")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def inputs(model_or_chans, dtype, n=2, img=(16, 16)):
    chans = model_or_chans if isinstance(model_or_chans, int) else model_or_chans.in_chans
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(n, chans, *img, generator=g, dtype=dtype)
    noise = torch.rand(n, (img[0] // 4) * (img[1] // 4), generator=g, dtype=dtype)
    return imgs, noise


def assert_same_outputs(hf, ours, dtype, mask_ratio=0.75):
    imgs, noise = inputs(ours, dtype)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=mask_ratio, noise=noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, **TOL[dtype])
    torch.testing.assert_close(out.loss, loss, **TOL[dtype])


# ---- Hugging Face --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_from_hf_instance_and_directory(tmp_path, dtype, in_chans):
    hf = hf_model(in_chans, dtype)
    ours, report = convert.from_hf(hf, return_report=True, backend="reference")
    assert ours.cls_token.dtype == dtype and ours.in_chans == in_chans and ours.norm_pix_loss
    assert report.mask_ratio == 0.75 and report.dropped == []
    assert sum(m.count(" + ") == 2 and "qkv" in m for m in report.mapped) == 2 * 3  # (w, b) x 3 layers: q+k+v -> qkv
    assert_same_outputs(hf, ours, dtype)
    hf.save_pretrained(tmp_path / "hf")
    again = convert.from_hf(tmp_path / "hf", backend="reference")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_to_hf_loads_in_from_pretrained_with_equal_outputs(tmp_path, dtype, in_chans):
    ours = mae_model(in_chans, dtype)
    out = convert.to_hf(ours, tmp_path / "hf", mask_ratio=0.75)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out, dtype=dtype).eval()
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss and hf.config.num_channels == in_chans
    assert_same_outputs(hf, ours, dtype)
    back = convert.from_hf(out, backend="reference")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_hub_layout_reads_here_and_in_transformers(tmp_path):
    """A directory in the Hub's (transformers 4.x) names -- vit.encoder.layer.N.attention.attention.query,
    decoder.decoder_layers.N... -- written without transformers: both readers take it."""
    from safetensors.torch import save_file
    ours = mae_model(3, torch.float32)
    d = tmp_path / "hub"
    d.mkdir()
    hub_names = convert.hf_state_dict(ours)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in hub_names
    assert "decoder.decoder_layers.0.output.dense.bias" in hub_names
    save_file(hub_names, str(d / "model.safetensors"))
    cfg = convert.hf_config_dict(convert.architecture(ours))
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "vit_mae",
                                               "architectures": ["ViTMAEForPreTraining"]}))
    hf = transformers.ViTMAEForPreTraining.from_pretrained(d).eval()
    assert_same_outputs(hf, ours, torch.float32)
    back = convert.from_hf(d)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_hf_qkv_bias_false_is_a_zero_bias():
    hf = hf_model(3, torch.float64, qkv_bias=False)
    ours, report = convert.from_hf(hf, return_report=True, backend="reference")
    assert torch.equal(ours.blocks[0].attn.qkv.bias, torch.zeros(96, dtype=torch.float64))
    assert any("qkv_bias=False" in n for n in report.notes)
    assert_same_outputs(hf, ours, torch.float64)


def test_hf_encoder_only_model_needs_strict_decoder_false():
    hf = hf_model(3, torch.float64)
    with pytest.raises(ValueError, match=r"has no decoder.*decoder\.decoder_embed\.weight.*strict_decoder=False"):
        convert.from_hf(hf.vit)
    ours, report = convert.from_hf(hf.vit, strict_decoder=False, return_report=True)
    assert any("decoder keeps its random init" in n for n in report.notes)
    imgs, noise = inputs(3, torch.float64)
    with torch.no_grad():
        latent, _, _ = ours.forward_encoder(imgs, 0.75, noise)
        torch.testing.assert_close(latent, hf.vit(imgs, noise=noise).last_hidden_state, **TOL[torch.float64])


def test_non_square_to_hf_is_refused_and_writes_nothing(tmp_path):
    ours = mae_model(3, torch.float32, img_size=(16, 24))
    with pytest.raises(ValueError, match="square images only"):
        convert.to_hf(ours, tmp_path / "hf")
    assert os.listdir(tmp_path) == []


def test_hf_directory_of_another_architecture(tmp_path):
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"vit/config.json.*model_type is 'vit'.*ViTForImageClassification"):
        convert.from_hf(tmp_path / "vit")
    # a vit_mae config with ViT classifier weights: the unexpected key is named
    (tmp_path / "vit" / "config.json").write_text(json.dumps(convert.hf_config_dict(
        dict(convert.architecture(mae_model(3, torch.float32)), embed_dim=32, depth=1)) | {"model_type": "vit_mae"}))
    with pytest.raises(ValueError, match=r"model.safetensors.*unexpected key 'classifier.bias'"):
        convert.from_hf(tmp_path / "vit")


def test_hf_sizes_that_do_not_match_the_config(tmp_path):
    hf_model(3, torch.float32).save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"], cfg["decoder_intermediate_size"] = 96, 48  # weights have 64 / 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors.*vit.encoder.layer.0.intermediate.dense.weight"
                                         r".*\(64, 32\).*blocks.0.mlp.fc1.weight \(96, 32\)"):
        convert.from_hf(tmp_path / "hf")
    cfg["decoder_intermediate_size"] = 40  # not the encoder's ratio
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*decoder_intermediate_size 40.*one mlp_ratio"):
        convert.from_hf(tmp_path / "hf")


def test_truncated_hf_weights_name_the_file(tmp_path):
    hf_model(3, torch.float32).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="model.safetensors"):
        convert.from_hf(tmp_path / "hf")


def test_missing_optional_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        convert.to_hf(mae_model(3, torch.float32), tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        checkpoint.save_state_dict(tmp_path / "w.safetensors", {"w": torch.ones(1)})
    assert os.listdir(tmp_path) == []


# ---- timm ----------------------------------------------------------------------------------
def _timm_vit():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception as e:  # e.g. a torchvision built for another torch in the torch-2.11 lane
        pytest.skip(f"timm not importable here ({type(e).__name__}: {e}); pinned in requirements-dev.txt")
    return VisionTransformer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_chans,img", [(1, (16, 24)), (3, (16, 16))])
def test_to_timm_forward_features_equal_the_encoder(dtype, in_chans, img):
    VisionTransformer = _timm_vit()
    ours = mae_model(in_chans, dtype, img_size=img)
    report = convert.ConversionReport()
    sd = convert.to_timm(ours, report)
    timm_model = VisionTransformer(**convert.timm_kwargs(ours)).to(dtype).eval()
    timm_model.load_state_dict(sd, strict=True)  # every timm key filled, nothing extra
    assert "decoder_embed.weight" in report.dropped and "mask_token" in report.dropped
    imgs, _ = inputs(ours, dtype, img=img)
    L = ours.patch_embed.num_patches
    in_order = torch.arange(L, dtype=dtype).expand(2, L)  # argsort = identity: all patches, in order
    with torch.no_grad():
        latent, mask, _ = ours.forward_encoder(imgs, 0.0, in_order)
        assert latent.shape == (2, L + 1, ours.cls_token.shape[-1]) and not mask.any()
        torch.testing.assert_close(timm_model.forward_features(imgs), latent, **TOL[dtype])


@pytest.mark.parametrize("factory,timm_name", [
    ("mae_vit_base_patch16", "vit_base_patch16_224"),
    ("mae_vit_large_patch16", "vit_large_patch16_224"),
    ("mae_vit_huge_patch14", "vit_huge_patch14_224"),
])
def test_timm_model_for_the_official_sizes(factory, timm_name):
    """The documented recipe: timm.create_model(NAME, num_classes=0) has exactly to_timm's keys and
    shapes (meta tensors: no memory, no init)."""
    _timm_vit()
    import timm
    with torch.device("meta"):
        ours = getattr(mae_fast, factory)()
        theirs = timm.create_model(timm_name, num_classes=0, pretrained=False)
    sd = convert.to_timm(ours)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert convert.timm_kwargs(ours)["num_heads"] == theirs.blocks[0].attn.num_heads


# ---- official / mae_fast .pth and safetensors ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_official_safetensors_hf_round_trip(tmp_path, dtype):
    ours = mae_model(3, dtype)
    src = tmp_path / "checkpoint-7.pth"
    args = argparse.Namespace(model="custom", input_size=16, norm_pix_loss=True)
    torch.save({"model": ours.state_dict(), "optimizer": {}, "epoch": 7, "scaler": {}, "args": args}, src)
    convert.convert(src, tmp_path / "w.safetensors", to="safetensors", num_heads=4, decoder_num_heads=2)
    convert.convert(tmp_path / "w.safetensors", tmp_path / "hf", to="hf")  # heads from the metadata
    convert.convert(tmp_path / "hf", tmp_path / "back.pth", to="official")
    back, report = convert.load_mae(tmp_path / "back.pth")
    assert report.dropped == [] and report.interpolated == []
    assert convert.architecture(back) == convert.architecture(ours)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and back.state_dict()[k].dtype == dtype, k
    # the official loader reads the .pth as it reads the released weights
    fresh = mae_model(3, dtype)
    mae_fast.load_official_checkpoint(fresh, tmp_path / "back.pth")


def test_official_names_need_no_heads(tmp_path):
    """An official-width checkpoint without args (as the released mae_pretrain_*.pth): heads
    from the official table. Meta tensors would not save: a real ViT-B is too big here, so
    the table is checked against the factories instead."""
    for factory, width in (("mae_vit_base_patch16", 768), ("mae_vit_large_patch16", 1024),
                           ("mae_vit_huge_patch14", 1280)):
        with torch.device("meta"):
            arch = convert.architecture(getattr(mae_fast, factory)())
        assert convert.OFFICIAL_HEADS[width] == arch["num_heads"]
        assert convert.OFFICIAL_DECODER_HEADS[arch["decoder_embed_dim"]] == arch["decoder_num_heads"]
        assert arch["layer_norm_eps"] == 1e-6


def test_img_size_change_interpolates(tmp_path):
    ours = mae_model(3, torch.float32)
    src = tmp_path / "w.safetensors"
    checkpoint.save_state_dict(src, ours.state_dict(), metadata=convert.architecture(ours))
    report = convert.convert(src, tmp_path / "big.pth", to="official", img_size=[24, 24])
    assert report.interpolated == ["pos_embed", "decoder_pos_embed"]
    big, _ = convert.load_mae(tmp_path / "big.pth")
    assert big.pos_embed.shape == (1, 37, 32)


def test_bad_state_dicts_name_file_and_key(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, resnet)
    with pytest.raises(ValueError, match=r"resnet.pth.*not an MAE state_dict.*'cls_token'"):
        convert.load_mae(resnet)
    odd = mae_fast.MaskedAutoencoderViT(**{**ARCH, "embed_dim": 40, "num_heads": 5})
    path = tmp_path / "odd.pth"
    torch.save({"model": odd.state_dict()}, path)
    with pytest.raises(ValueError, match=r"odd.pth.*heads of a 40-wide.*pass num_heads="):
        convert.load_mae(path)
    sd = odd.state_dict()
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(40, 7)
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"odd.pth.*blocks.1.mlp.fc2.weight"):
        convert.load_mae(path, num_heads=5, decoder_num_heads=2)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(resnet.read_bytes()[:64])
    with pytest.raises(ValueError, match="cut.pth"):
        convert.convert(cut, tmp_path / "out.safetensors", to="safetensors")
    assert sorted(os.listdir(tmp_path)) == ["cut.pth", "odd.pth", "resnet.pth"]  # nothing written


def test_optional_packages_are_not_imported_by_mae_fast():
    import subprocess
    code = ("import sys, mae_fast, mae_fast.convert, mae_fast.checkpoint; "
            "print([m for m in ('transformers', 'timm', 'safetensors', 'torchvision') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_square_one_channel_pth_safetensors_round_trip(tmp_path, dtype):
    """Non-square images and 1 channel (HF cannot hold them; .pth and safetensors can): the
    architecture travels in the metadata, the weights bit for bit, the outputs equal."""
    ours = mae_model(1, dtype, img_size=(16, 24), num_heads=8)
    src = tmp_path / "a.pth"
    checkpoint.save_state_dict(src, ours.state_dict(), metadata=convert.architecture(ours))
    convert.convert(src, tmp_path / "b.safetensors", to="safetensors")
    convert.convert(tmp_path / "b.safetensors", tmp_path / "c.pth", to="official")
    back, _ = convert.load_mae(tmp_path / "c.pth")
    assert convert.architecture(back) == convert.architecture(ours)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and back.state_dict()[k].dtype == dtype, k
    back.eval()  # backend "auto" (the fused CPU ops where they run): equal within rounding
    imgs, noise = inputs(ours, dtype, img=(16, 24))
    with torch.no_grad():
        for a, b in zip(ours(imgs, 0.75, noise), back(imgs, 0.75, noise)):
            torch.testing.assert_close(b, a, **TOL[dtype])
