"""--decode pil-draft: a JPEG whose random crop is at least twice the output is decoded at a reduced
DCT scale (PIL ``draft``); the crop and flip draws are those of the full decode, so the pixels are
close to it (not equal); other formats, small crops and decoded images are left alone."""
import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data import DataError, ImageFolder, jpeg_draft


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
    with pytest.raises(DataError, match="decode mode 'gpu'"):
        ImageFolder(tmp_path, 16, decode="gpu")


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
