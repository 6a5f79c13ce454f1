"""--amp auto on CPU: bf16 only where the CPU has native bf16 and the model is wide enough;
the header says which and why; the probe's features follow --amp."""
import re

import pytest
import torch

from mae_fast import cli, linprobe, pretrain
from mae_fast.train import amp

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, width, expect, why", [
    (True, 768, torch.bfloat16, "native bf16"),
    (True, 1024, torch.bfloat16, "native bf16"),
    (True, 96, None, "width 96 < 768"),
    (False, 768, None, "no native bf16"),
])
def test_auto_on_cpu(monkeypatch, native, width, expect, why):
    monkeypatch.setattr(amp, "cpu_native_bf16", lambda: (native, "test CPU"))
    dtype, reason = amp.resolve_amp("auto", CPU, width=width)
    assert dtype == expect and why in reason


def test_forced_dtypes_ignore_the_cpu():
    assert amp.resolve_amp("none", CPU, width=4096)[0] is None
    assert amp.resolve_amp("bf16", CPU, width=8)[0] == torch.bfloat16
    assert amp.resolve_amp("fp16", CPU)[0] == torch.float16


def test_cpu_native_bf16_answers():
    native, what = amp.cpu_native_bf16()
    assert isinstance(native, bool) and what


def test_header_says_which_and_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(amp, "cpu_native_bf16", lambda: (True, "test CPU"))
    args = ["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4", "--builtin-size", "8",
            "--epochs", "1", "--num-preview", "0", "--no-progress", "--no-linprobe", "--device", "cpu",
            "--num-threads", "1", "--output-dir", str(tmp_path / "run")]
    assert pretrain.main(args) == 0
    out = capsys.readouterr().out
    assert "amp none (auto: fp32, the CPU has native bf16 (test CPU) but width 64 < 768" in out
    monkeypatch.setattr(amp, "CPU_BF16_MIN_WIDTH", 64)
    assert pretrain.main(args) == 0
    assert "amp bf16 (auto: bf16, the CPU has native bf16 (test CPU))" in capsys.readouterr().out


def test_probe_features_under_bf16_are_close_to_fp32():
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=16)
    imgs = torch.randn(10, 3, 16, 16)
    f32 = linprobe.encoder_features(model, imgs)
    bf16 = linprobe.encoder_features(model, imgs, amp_dtype=torch.bfloat16)
    assert not (f32 == bf16).all()  # autocast did run
    torch.testing.assert_close(torch.from_numpy(bf16), torch.from_numpy(f32), rtol=0.05, atol=0.05)


def test_linprobe_cli_amp(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(["--model", "mae_vit_tiny_patch4", "--input-size", "16", "--batch-size", "4",
                          "--builtin-size", "8", "--epochs", "1", "--num-preview", "0", "--no-progress",
                          "--no-linprobe", "--device", "cpu", "--num-threads", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["linprobe", "--checkpoint", str(out / "checkpoint-last.pth"), "--device", "cpu",
                     "--amp", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "amp bf16 (--amp bf16)" in printed and "bf16 autocast -> logistic regression" in printed
    accs = [float(a) for a in re.findall(r"encoder: +([0-9.]+)% accuracy", printed)]
    assert len(accs) == 2 and all(10.0 < a <= 100.0 for a in accs)
