"""Unreadable images in an ImageFolder (truncated JPEG, empty file, text named .jpg): the trainer
replaces each by a substitute chosen from the sample's key, warns with the path, counts them in
log.csv (bad_samples) and trains to the end; --strict-data stops at the first one naming it. The
substitutes keep batches full and a function of their keys: the same pixels with any number of
workers, and kill-and-resume still reproduces the uninterrupted losses."""
import csv
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import cli
from mae_fast.data import DataError, ImageFolder, UnreadableImage
from mae_fast.train.loader import BadFiles, EpochBatches, build_loader

from test_pretrain import TINY, read_log

BAD_NAMES = ("truncated.jpg", "empty.png", "notes.jpg")


def _write_tree(root, per_class=4, bad=True):
    """2 classes x ``per_class`` good JPEG/PNG images, plus (``bad``) the three unreadable files in
    class ``b``; a .txt file that is not an image name is ignored by the ImageFolder."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(root / cls / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    (root / "a" / "README.txt").write_text("not an image, not an image name")
    if bad:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        (root / "b" / BAD_NAMES[0]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (root / "b" / BAD_NAMES[1]).write_bytes(b"")
        (root / "b" / BAD_NAMES[2]).write_text("this is text, not a JPEG\n")
    return root


def _bad_indices(data):
    return [i for i, (p, _) in enumerate(data.samples) if os.path.basename(p) in BAD_NAMES]


def test_each_kind_of_bad_file_raises_naming_it_and_load_substitutes(tmp_path):
    data = ImageFolder(_write_tree(tmp_path / "d"), 16)
    assert len(data) == 11  # 8 good + 3 bad; README.txt is not listed
    bad = _bad_indices(data)
    assert len(bad) == 3
    for i in bad:
        with pytest.raises(UnreadableImage, match=os.path.basename(data.samples[i][0])):
            data[(i, 123)]
        with pytest.raises(DataError):  # UnreadableImage is a DataError (clear CLI error)
            data[i]
        img, passed_over = data.load((i, 123))
        assert img.shape == (3, 16, 16) and torch.isfinite(img).all()
        assert passed_over[0][0] == data.samples[i][0] and passed_over[0][1]  # (path, reason)
        # the substitute is a good sample drawn from the key alone: same key, same pixels
        sub = data.substitute((i, 123), len(passed_over) - 1)
        assert sub[0] not in bad
        torch.testing.assert_close(img, data[sub], rtol=0, atol=0)
        torch.testing.assert_close(data.load((i, 123))[0], img, rtol=0, atol=0)
        assert data.substitute((i, 124), 0) != data.substitute((i, 123), 0)  # another seed (epoch): another pick
        # the evaluation view (an int key) substitutes too
        assert data.load(i)[0].shape == (3, 16, 16)
    good = next(i for i in range(len(data)) if i not in bad)
    img, passed_over = data.load((good, 5))
    assert passed_over == ()
    torch.testing.assert_close(img, data[(good, 5)], rtol=0, atol=0)


def test_a_tree_of_only_unreadable_files_gives_a_clear_error(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    (tmp_path / "d" / "c" / "x.jpg").write_bytes(b"")
    data = ImageFolder(tmp_path / "d", 16)
    with pytest.raises(DataError, match="unreadable images in a row"):
        data.load((0, 1))


@pytest.mark.parametrize("workers, decode", [(0, "pil"), (2, "pil"), (2, "pil-draft"), (2, "torchvision")])
def test_loader_batches_stay_full_and_equal_for_any_worker_count(tmp_path, workers, decode):
    if decode == "torchvision":
        pytest.importorskip("torchvision")
    data = ImageFolder(_write_tree(tmp_path / "d"), 16, decode=decode)
    out = {}
    for w in (0, workers):
        batches = EpochBatches(data, batch_size=3, seed=1)
        batches.set_epoch(1)
        got = list(build_loader(data, batches, w, torch.device("cpu")))
        assert [b.shape for b, _ in got] == [(3, 3, 16, 16)] * 3
        out[w] = (torch.cat([b for b, _ in got]), sorted(p for _, bad in got for p, _ in bad))
    torch.testing.assert_close(out[workers][0], out[0][0], rtol=0, atol=0)
    assert out[workers][1] == out[0][1]


def test_bad_files_warns_once_per_path_counts_per_window_or_stops(capsys):
    report = BadFiles(strict=False)
    report.note((("/x/a.jpg", "OSError: truncated"),))
    report.note((("/x/a.jpg", "OSError: truncated"), ("/x/b.jpg", "UnidentifiedImageError: ...")))
    err = capsys.readouterr().err
    assert err.count("/x/a.jpg") == 1 and err.count("/x/b.jpg") == 1 and "warning" in err
    assert report.take_window() == 3 and report.take_window() == 0 and report.total == 3
    with pytest.raises(DataError, match=r"/x/a\.jpg.*--strict-data"):
        BadFiles(strict=True).note((("/x/a.jpg", "OSError: truncated"),))
    BadFiles(strict=True).note(())  # a clean batch passes


def _pretrain(tmp_path, out, *extra):
    data = tmp_path / "data"
    if not data.exists():
        _write_tree(data)
    # 11 images, batch 2: 5 iterations an epoch
    return cli.main(["pretrain", *TINY, "--data-path", str(data), "--batch-size", "2", "--output-dir",
                     str(tmp_path / out), *map(str, extra)])


def test_training_over_a_tree_with_bad_files_runs_to_the_end_and_counts_them(tmp_path, capsys):
    assert _pretrain(tmp_path, "run", "--epochs", 2) == 0
    steps, losses = read_log(tmp_path / "run")
    assert steps == list(range(10)) and torch.isfinite(losses).all()
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        bad_counts = [int(r["bad_samples"]) for r in csv.DictReader(f) if r["loss"]]
    # each epoch visits 10 of the 11 images (drop_last); every bad index drawn, and every bad
    # substitute drawn for it, is one replaced sample
    expected = 0
    data = ImageFolder(tmp_path / "data", 16)
    bad = set(_bad_indices(data))
    for epoch in range(2):
        batches = EpochBatches(data, batch_size=2, seed=0)
        batches.set_epoch(epoch)
        for key in (key for batch in batches for key in batch):
            cur, attempt = key, 0
            while cur[0] in bad:
                expected, cur, attempt = expected + 1, data.substitute(key, attempt), attempt + 1
    assert expected > 0 and sum(bad_counts) == expected
    err = capsys.readouterr().err
    warned = [p for p, _ in data.samples if f"skipping unreadable image {p!r}" in err]
    assert warned and all(os.path.basename(p) in BAD_NAMES for p in warned)
    assert all(err.count(f"skipping unreadable image {p!r}") == 1 for p in warned)  # once per file


def test_strict_data_stops_at_the_first_bad_file_naming_it(tmp_path, capsys):
    assert _pretrain(tmp_path, "run", "--epochs", 1, "--strict-data") == 2
    err = capsys.readouterr().err
    assert "--strict-data" in err and any(os.path.join("b", name) in err for name in BAD_NAMES)
    assert "Traceback" not in err


def test_kill_and_resume_with_bad_files_reproduces_the_uninterrupted_losses(tmp_path):
    extra = ["--epochs", 2, "--save-every-steps", 2]
    assert _pretrain(tmp_path, "whole", *extra) == 0
    assert _pretrain(tmp_path, "killed", *extra, "--num-workers", 1, "--simulate-kill-after-steps", 7) == 137
    assert _pretrain(tmp_path, "killed", *extra, "--resume", "auto") == 0
    steps_whole, losses_whole = read_log(tmp_path / "whole")
    steps_resumed, losses_resumed = read_log(tmp_path / "killed")
    assert steps_resumed == steps_whole == list(range(10))
    torch.testing.assert_close(losses_resumed, losses_whole, rtol=0, atol=0)
