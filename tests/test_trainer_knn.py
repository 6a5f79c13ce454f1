"""The kNN monitor: the weighted vote on hand-made features, and --knn-every in a run (printed,
log.csv), on digits and on an ImageFolder (--knn-data)."""
import csv

import pytest
import torch

from mae_fast.knn import KnnMonitor, knn_accuracy
from mae_fast import pretrain

from test_pretrain import TINY, _write_image_folder, read_log, run_pretrain


def test_knn_accuracy_on_separable_and_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(30)  # (120,)
    feats = centers[labels] + 0.1 * torch.randn(120, 8, generator=g)
    tr, te = torch.arange(0, 120, 2), torch.arange(1, 120, 2)
    assert knn_accuracy(feats[tr], labels[tr], feats[te], labels[te], k=5) == 1.0
    # nearest neighbour of a point that is its own training twin: weights follow similarity
    assert knn_accuracy(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 2]), k=1) == 1.0
    perm = labels[torch.randperm(120, generator=g)]
    assert knn_accuracy(feats[tr], perm[tr], feats[te], labels[te], k=5) < 0.6  # labels carry nothing
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(feats, labels, feats, labels, k=0)


def test_monitor_on_digits_sees_more_than_chance():
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    monitor = KnnMonitor(16)
    assert len(monitor.train_idx) + len(monitor.test_idx) == 1797
    acc = monitor(model)
    assert 0.3 < acc <= 1.0  # 10 classes: chance is 0.1; random features of digits already cluster
    assert monitor(model) == acc  # deterministic


def test_knn_every_in_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretrain(out, "--knn-every", 2, "--epochs", 3, "--builtin-size", 8) == 0
    printed = capsys.readouterr().out
    assert printed.count("kNN accuracy on digits (k=20") == 2  # epoch 2, and after the last (3)
    with open(out / "log.csv", newline="") as f:
        knn_rows = [r for r in csv.DictReader(f) if r["knn_acc"]]
    assert [int(r["epoch"]) for r in knn_rows] == [1, 2]
    assert all(0.0 < float(r["knn_acc"]) <= 1.0 for r in knn_rows)
    assert read_log(out)[0] == list(range(6))  # the training rows are unchanged


def test_knn_data_image_folder(tmp_path, capsys):
    _write_image_folder(tmp_path / "knn", classes=("a", "b"), per_class=8)
    assert run_pretrain(tmp_path / "run", "--epochs", 1, "--builtin-size", 8, "--knn-every", 1,
                        "--knn-data", tmp_path / "knn") == 0
    assert f"kNN accuracy on {tmp_path / 'knn'}" in capsys.readouterr().out


def test_bad_knn_arguments(tmp_path, capsys):
    assert pretrain.main(TINY + ["--output-dir", str(tmp_path / "r"), "--knn-every", "-1"]) == 2
    assert pretrain.main(TINY + ["--output-dir", str(tmp_path / "r"), "--knn-every", "1",
                                 "--knn-data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--knn-every must be >= 0" in err and "--knn-data" in err and "Traceback" not in err
