"""--decode: "auto" is torchvision when it imports and PIL otherwise (the fallback, same draws);
"gpu" leaves JPEGs encoded for a batched decode on the device (run here on the CPU, and in the CUDA
lane on the GPU), falling back to the CPU without CUDA; output="uint8" is the float view before its
normalisation. --decode pil-draft: a JPEG whose random crop is at least twice the output is decoded at a reduced
DCT scale (PIL ``draft``); the crop and flip draws are those of the full decode, so the pixels are
close to it (not equal); other formats, small crops and decoded images are left alone."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import data as data_module
from mae_fast.data import (BuiltinImages, DataError, GpuJpeg, ImageFolder, jpeg_draft, resolve_decode,
                           to_normalized_tensor)
from mae_fast.train.loader import EpochBatches, GpuBatch, build_loader, to_device


def _smooth_rgb(w, h):
    """A smooth, left-right asymmetric picture (a wrong flip or crop would show)."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    arr = np.stack([x, y, 0.5 + 0.5 * np.sin(3 * x + 2 * y)], axis=2)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def test_jpeg_draft_picks_the_dct_scale_that_keeps_the_crop_above_the_output(tmp_path):
    _smooth_rgb(256, 192).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as img:
        img, box = jpeg_draft(img, (0, 0, 256, 192), 16)
        assert img.size == (32, 24)  # 1/8: the smallest scale with both sides >= 16
        assert box == (0, 0, 32, 24)
    with Image.open(tmp_path / "a.jpg") as img:
        img, box = jpeg_draft(img, (64, 32, 192, 160), 32)  # a 128 x 128 crop to 32: 1/4
        assert img.size == (64, 48) and box == (16, 8, 48, 40)
    with Image.open(tmp_path / "a.jpg") as img:
        assert jpeg_draft(img, (0, 0, 60, 60), 32) == (img, (0, 0, 60, 60))  # crop < 2x output
        assert img.size == (256, 192)
    _smooth_rgb(256, 192).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as img:
        assert jpeg_draft(img, (0, 0, 256, 192), 16)[1] == (0, 0, 256, 192)  # not a JPEG
        assert img.size == (256, 192)


def test_draft_views_are_close_to_the_full_decode(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    for i in range(3):
        _smooth_rgb(320 + 16 * i, 240).save(tmp_path / "d" / "c" / f"{i}.jpg", quality=95)
    full = ImageFolder(tmp_path / "d", 32)
    draft = ImageFolder(tmp_path / "d", 32, decode="pil-draft")
    for key in [(0, 1), (1, 2), (2, 3), (0, 4)]:
        a, b = full[key], draft[key]  # (3, 32, 32) normalised
        assert a.shape == b.shape == (3, 32, 32)
        assert not torch.equal(a, b)  # really decoded differently
        # same crop and flip: the mean difference is a small fraction of the normalised range
        assert (a - b).abs().mean() < 0.05, (key, (a - b).abs().mean())
    # the evaluation view is the full decode in both modes
    torch.testing.assert_close(draft[0], full[0], rtol=0, atol=0)


def test_unknown_decode_mode_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="decode mode 'nvjpeg'"):
        ImageFolder(tmp_path, 16, decode="nvjpeg")


def test_torchvision_views_match_the_pil_views_closely(tmp_path):
    pytest.importorskip("torchvision")
    (tmp_path / "d" / "c").mkdir(parents=True)
    for i in range(3):
        _smooth_rgb(96 + 8 * i, 64).save(tmp_path / "d" / "c" / f"{i}.jpg", quality=95)
    _smooth_rgb(80, 72).save(tmp_path / "d" / "c" / "3.png")
    pil = ImageFolder(tmp_path / "d", 24)
    tv = ImageFolder(tmp_path / "d", 24, decode="torchvision")
    for key in [(0, 1), (1, 2), (2, 3), (3, 4), (3, 5)]:
        a, b = pil[key], tv[key]
        assert b.shape == (3, 24, 24) and b.dtype == torch.float32
        # the same crop and flip; decoders and bicubic kernels differ by about a grey level
        assert (a - b).abs().mean() < 0.02, (key, (a - b).abs().mean())


def test_torchvision_decode_reports_unreadable_files(tmp_path):
    pytest.importorskip("torchvision")
    from test_data_bad_files import _bad_indices, _write_tree
    from mae_fast.data import UnreadableImage
    data = ImageFolder(_write_tree(tmp_path / "d"), 16, decode="torchvision")
    for i in _bad_indices(data):
        with pytest.raises(UnreadableImage, match=data.samples[i][0].split("/")[-1]):
            data[(i, 7)]
        img, bad = data.load((i, 7))
        assert img.shape == (3, 16, 16) and bad[0][0] == data.samples[i][0]


def _tree(root, n=3, png=True):
    (root / "c").mkdir(parents=True)
    for i in range(n):
        _smooth_rgb(96 + 8 * i, 64).save(root / "c" / f"{i}.jpg", quality=95)
    if png:
        _smooth_rgb(80, 72).save(root / "c" / f"{n}.png")
    return root


def test_auto_is_torchvision_when_it_imports_else_pil(tmp_path, monkeypatch):
    root = _tree(tmp_path / "d")
    has_tv = data_module.torchvision_error() is None
    assert ImageFolder(root, 16).decode == ("torchvision" if has_tv else "pil")
    assert BuiltinImages(16, 4).decode == ("torchvision" if has_tv else "pil")
    # without torchvision: auto and gpu fall back to PIL (saying why), torchvision is a clear error
    monkeypatch.setattr(data_module, "_TV_ERROR", "ModuleNotFoundError: No module named 'torchvision'")
    assert resolve_decode("auto") == ("pil", "auto: torchvision not importable "
                                             "(ModuleNotFoundError: No module named 'torchvision')")
    mode, why = resolve_decode("gpu", cuda=True)
    assert mode == "pil" and "--decode gpu needs torchvision" in why and "decoding on the CPU" in why
    assert ImageFolder(root, 16).decode == BuiltinImages(16, 4).decode == "pil"
    with pytest.raises(DataError, match=r"mae_fast\[torchvision\]"):
        ImageFolder(root, 16, decode="torchvision")


def test_gpu_decode_without_cuda_falls_back_to_the_cpu_with_the_reason():
    mode, why = resolve_decode("gpu", cuda=False)
    assert mode in ("torchvision", "pil")
    assert "not a CUDA GPU" in why or "torchvision not importable" in why
    assert mode == resolve_decode("auto")[0]


@pytest.mark.parametrize("dataset", ["folder", "builtin"])
def test_uint8_output_normalised_equals_the_float_output(tmp_path, dataset):
    modes = ["pil"] + (["torchvision"] if data_module.torchvision_error() is None else [])
    for decode in modes:
        if dataset == "folder":
            root = _tree(tmp_path / decode)
            f, u = (ImageFolder(root, 24, decode=decode, output=o) for o in ("float", "uint8"))
        else:
            f, u = (BuiltinImages(24, 8, decode=decode, output=o) for o in ("float", "uint8"))
        for key in [(0, 1), (1, 2), (2, 3), (3, 4)]:
            x = u[key]
            assert x.dtype == torch.uint8 and x.shape == (3, 24, 24)
            torch.testing.assert_close(to_normalized_tensor(x), f[key], rtol=0, atol=0)
        assert u[0].dtype == torch.float32  # the evaluation view stays float
    batches = EpochBatches(u, batch_size=2, seed=0)
    imgs, _ = next(iter(build_loader(u, batches, 0, torch.device("cpu"))))
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 3, 24, 24)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gpu_decode_batches_the_jpegs_on_the_device(tmp_path, dev):
    """decode="gpu" (forced on with cuda=True; on the CPU lane the batched decode_jpeg runs on the CPU):
    JPEGs reach the main process encoded, PNGs decoded; the views equal the torchvision CPU views
    (exactly on the CPU; within the nvjpeg/libjpeg IDCT difference on CUDA), a truncated JPEG that
    passes the header check is substituted after the device decode fails, and reported."""
    pytest.importorskip("torchvision")
    root = _tree(tmp_path / "d", n=5)
    gpu = ImageFolder(root, 24, decode="gpu", cuda=True)
    cpu = ImageFolder(root, 24, decode="torchvision")
    assert gpu.decode == "gpu"
    assert isinstance(gpu[(0, 5)], GpuJpeg) and gpu[(5, 5)].shape == (3, 24, 24)  # the PNG: decoded
    batches = EpochBatches(gpu, batch_size=3, seed=0)
    for batch, keys in zip(build_loader(gpu, batches, 0, torch.device(dev)), list(batches)):  # cuda: pinned
        imgs, bad = batch
        assert isinstance(imgs, GpuBatch) and bad == ()
        out, late_bad = to_device(imgs, torch.device(dev), gpu)  # (3, 3, 24, 24) on dev
        assert out.device.type == dev and out.shape == (3, 3, 24, 24) and late_bad == ()
        want = torch.stack([cpu[k] for k in keys])
        if dev == "cpu":
            torch.testing.assert_close(out, want, rtol=0, atol=0)
        else:
            assert (out.cpu() - want).abs().mean() < 0.02
    # a JPEG cut after its headers and part of its scan (the tree of test_data_bad_files cuts a small
    # one inside its headers: that one the worker's header check already rejects)
    (tmp_path / "bad" / "c").mkdir(parents=True)
    _smooth_rgb(64, 48).save(tmp_path / "bad" / "c" / "0.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=90)
    (tmp_path / "bad" / "c" / "1_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 5])
    bad_tree = ImageFolder(tmp_path / "bad", 16, decode="gpu", cuda=True)
    truncated = 1
    view = bad_tree[(truncated, 9)]
    assert isinstance(view, GpuJpeg)  # the header reads: only the decode finds the damage
    out, late_bad = to_device(GpuBatch([view, bad_tree[(0, 9)]]), torch.device(dev), bad_tree)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out.float()).all()
    if dev == "cuda" and not late_bad:
        return  # nvjpeg decoded what it could of the truncated stream (not measured: no GPU here)
    assert [p for p, _ in late_bad] == [bad_tree.samples[truncated][0]]
    # its substitute was made on the CPU, as dataset.load makes it
    torch.testing.assert_close(out[0].cpu(), bad_tree.load((truncated, 9), "torchvision")[0], rtol=0, atol=0)


@pytest.mark.parametrize("extra", [[], ["--contrastive-weight", "0.03"]], ids=["plain", "contrastive"])
def test_input_dtype_uint8_trains_the_same_as_float(tmp_path, capsys, extra):
    """--input-dtype uint8 ships uint8 batches to the model, which normalises them in its kernels
    (set_input_normalization, issue 15 item 2): the run is the float run, bit for bit (every
    logged loss and every final weight); with --contrastive-weight too (two uint8 views per
    image, the ContrastiveMAE's two masked forwards)."""
    from mae_fast import pretrain
    from test_pretrain import TINY, load_ckpt, read_log
    runs = {}
    for dtype in ("float", "uint8"):
        out = tmp_path / dtype
        assert pretrain.main(TINY + extra + ["--epochs", "1", "--input-dtype", dtype, "--num-preview", "0",
                                             "--output-dir", str(out)]) == 0
        runs[dtype] = (read_log(out), load_ckpt(out / "checkpoint-last.pth")["model"])
    assert "uint8 batches" in capsys.readouterr().out
    (steps_f, loss_f), weights_f = runs["float"]
    (steps_u, loss_u), weights_u = runs["uint8"]
    assert steps_f == steps_u and len(steps_f) > 0 and torch.isfinite(loss_f).all()
    assert torch.equal(loss_f, loss_u)
    assert weights_f.keys() == weights_u.keys()
    for k in weights_f:
        assert torch.equal(weights_f[k], weights_u[k]), k

