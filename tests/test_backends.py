"""The one dispatch point: what each backend setting picks, and that info reports the same."""
import subprocess
import sys

import pytest
import torch

import mae_fast
from mae_fast import backends


@pytest.fixture
def dummy_op():
    backends.register_fast("dummy", "c++", lambda d: (d.type == "cpu", "built for CPU only"))
    yield "dummy"
    backends._FAST.pop("dummy")
    backends.clear_cache()


def test_auto_fast_reference(dummy_op):
    assert backends.choose(dummy_op, "cpu", "auto").impl == "c++"
    assert backends.choose(dummy_op, "cpu", "reference").impl == "reference"
    assert backends.choose(dummy_op, "cuda", "auto").impl == "reference"
    assert "built for CPU only" in backends.choose(dummy_op, "cuda", "auto").reason
    with pytest.raises(RuntimeError, match="backend='fast'.*built for CPU only"):
        backends.choose(dummy_op, "cuda", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose(dummy_op, "cpu", "fastest")


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.register_fast("dummy_triton", "triton", backends.triton_probe)
    try:
        assert backends.choose("dummy_triton", "cpu", "auto").impl == "reference"
        assert backends.choose("dummy_triton", "cpu", "fast").impl == "triton"
        assert backends.choose("dummy_triton", "cuda", "auto").impl == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backends.choose("dummy_triton", "cpu", "fast")
    finally:
        backends._FAST.pop("dummy_triton")
        backends.clear_cache()


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        backends.choose("no_such_op", "cpu")


def test_info_reports_what_choose_returns():
    out = subprocess.run([sys.executable, "-m", "mae_fast.info"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out and "mae_fast._C:" in out
    cpu_part, cuda_part = out.split("on cpu tensors:")[1].split("on cuda tensors:")
    for op in ("random_masking", "patch_embed_masked", "unshuffle", "masked_loss", "attention"):
        for part, device in ((cpu_part, "cpu"), (cuda_part, "cuda")):
            line = next(l for l in part.splitlines() if l.strip().startswith(op))
            want = backends.choose(op, device, "auto")
            assert line.split()[1] == want.impl, (device, line)


def test_model_reports_its_choices():
    model = mae_fast.MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    choices = model.backend_choices("cpu")
    assert set(choices) == {"random_masking", "patch_embed_masked", "unshuffle", "masked_loss", "attention",
                            "add_layer_norm"}


def test_gpus_older_than_sm80_take_the_reference(monkeypatch):
    # the kernels are compiled and checked for sm_80+; an older GPU must not get a kernel it cannot run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    backends.clear_cache()
    try:
        for op in ("patch_embed_masked", "masked_loss", "unshuffle", "random_masking", "add_layer_norm"):
            choice = backends.choose(op, "cuda", "auto")
            assert choice.impl == "reference" and "7.5 is below 8.0" in choice.reason, choice
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        backends.clear_cache()
        assert backends.choose("masked_loss", "cuda", "auto").impl == "triton"
    finally:
        backends.clear_cache()
