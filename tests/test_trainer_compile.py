"""--compile: torch.compile(fullgraph=True) of the model through mae_fast's ops trains like the
eager model; the compile time is printed once; a tensor lr (capturable AdamW for CUDA graphs)
follows the schedule in place."""
import argparse

import pytest
import torch

from mae_fast import pretrain
from mae_fast.train.step import build_optimizer, fused_adamw_supported, set_learning_rate

from test_pretrain import read_log, run_pretrain


def test_compiled_training_matches_eager(tmp_path, capsys):
    assert run_pretrain(tmp_path / "eager", "--epochs", 1) == 0
    capsys.readouterr()
    # aot_eager: dynamo captures the whole model (fullgraph) and AOTAutograd traces its backward,
    # without inductor's C++ compile (slow on this CPU)
    assert run_pretrain(tmp_path / "compiled", "--epochs", 1, "--compile", "--compile-backend", "aot_eager") == 0
    out = capsys.readouterr().out
    assert out.count("torch.compile (fullgraph, backend aot_eager, mode default): first iteration") == 1
    steps_e, losses_e = read_log(tmp_path / "eager")
    steps_c, losses_c = read_log(tmp_path / "compiled")
    assert steps_c == steps_e == [0, 1, 2, 3]
    torch.testing.assert_close(losses_c, losses_e, rtol=1e-5, atol=1e-6)
    ckpt = torch.load(tmp_path / "compiled" / "checkpoint-last.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["model"])  # saved from the uncompiled module


def test_bad_compile_backend_is_a_usage_error(tmp_path, capsys):
    assert run_pretrain(tmp_path / "run", "--compile", "--compile-backend", "no_such_backend") == 2
    err = capsys.readouterr().err
    assert "--compile" in err and "Traceback" not in err


def test_cuda_graphs_only_for_reduce_overhead_on_cuda():
    a = argparse.Namespace(compile=True, compile_mode="reduce-overhead")
    assert pretrain._cuda_graphs(a, torch.device("cuda"))
    assert not pretrain._cuda_graphs(a, torch.device("cpu"))
    assert not pretrain._cuda_graphs(argparse.Namespace(compile=True, compile_mode="default"), torch.device("cuda"))
    assert not pretrain._cuda_graphs(argparse.Namespace(compile=False, compile_mode="reduce-overhead"),
                                     torch.device("cuda"))


@pytest.mark.skipif(not fused_adamw_supported(torch.device("cpu")), reason="no fused AdamW on CPU here")
def test_capturable_optimizer_has_a_tensor_lr_per_group_set_in_place():
    """What --compile-mode reduce-overhead builds on CUDA, here on CPU (fused AdamW is capturable on CPU)."""
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    args = argparse.Namespace(lr=1e-3, min_lr=0.0, warmup_epochs=2, epochs=10, weight_decay=0.05, fused_adamw=None)
    opt = build_optimizer(model, args, torch.device("cpu"), capturable=True)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs) and lrs[0] is not lrs[1]
    assert opt.defaults["capturable"]
    opt.param_groups[1]["lr_scale"] = 0.5
    assert set_learning_rate(opt, 1.0, args) == pytest.approx(5e-4)  # half-way through warmup
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same tensors, filled in place
    assert float(lrs[0]) == pytest.approx(5e-4) and float(lrs[1]) == pytest.approx(2.5e-4)
