"""The lane machinery itself, and the views real launches pass that the kernel tests' own inputs
do not: the model's ``pred = x[:, 1:, :]``, which starts one row into the decoder's output. At
patch 14 in bf16/fp16 a row is 588 values = 1176 bytes, so the slice is 8-byte aligned, not 16
(Triton specialises on 16-byte alignment: another compiled variant). Both lanes (device fixture)."""
import pytest
import torch

from _lane import LANE
from test_triton_loss import DTYPES, _assert_matches_reference
from mae_fast import reference


def test_device_fixture_sets_the_default_device_and_tf32(device):
    assert torch.randn(1).device.type == device.type
    if device.type == "cuda":
        assert LANE == "cuda"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    else:
        assert LANE == "cpu"


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_loss_on_the_models_pred_slice(dtype, norm_pix, device):
    p, hw, N, C = 14, (28, 28), 2, 3  # ViT-H/14's patch; the aligned patch-16 slice: test_triton_loss
    L, P = (hw[0] // p) * (hw[1] // p), C * p * p
    decoder_out = torch.randn(N, 1 + L, P).to(dtype)  # (N, 1+L, p*p*C): cls row first
    pred = decoder_out[:, 1:, :].requires_grad_()  # (N, L, p*p*C), the model's slice
    row_bytes = P * decoder_out.element_size()
    assert (pred.data_ptr() - decoder_out.data_ptr()) == row_bytes
    if dtype != torch.float32:
        assert pred.data_ptr() % 16 == 8, "the case this test is for: an 8-byte aligned pred"
    imgs = torch.randn(N, C, *hw).to(dtype).requires_grad_()
    mask = reference.masking_indices(torch.rand(N, L), reference.num_keep(L, 0.5))[2]
    _assert_matches_reference(imgs, pred, mask, p, norm_pix)


def test_the_cuda_lane_is_one_environment_variable_away():
    """``MAE_FAST_TEST_DEVICE=cuda`` in a fresh process: Triton compiled (TRITON_INTERPRET=0 even if
    the shell exported 1), the cpu params skip as interpreter-lane tests and, without a GPU, the
    cuda params skip saying so; a bad value is refused."""
    import os
    import subprocess
    import sys

    from _lane import CPU_LANE_ONLY, NO_GPU

    here = os.path.dirname(os.path.abspath(__file__))
    test = os.path.basename(__file__) + "::test_device_fixture_sets_the_default_device_and_tf32"
    env = dict(os.environ, MAE_FAST_TEST_DEVICE="cuda", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", test, "-rs", "-p", "no:cacheprovider"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "mae_fast test lane: cuda (TRITON_INTERPRET=0)" in out
    assert CPU_LANE_ONLY in out
    if not torch.cuda.is_available():
        assert NO_GPU in out and "2 skipped" in out
    bad = subprocess.run([sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider"], cwd=here,
                         env=dict(env, MAE_FAST_TEST_DEVICE="gpu"), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "MAE_FAST_TEST_DEVICE must be 'cpu' or 'cuda'" in bad.stdout + bad.stderr
