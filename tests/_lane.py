"""Which test lane this pytest process is, decided once, before anything imports triton.

Triton decides at decoration time whether a kernel is interpreted (``TRITON_INTERPRET``), so one
process cannot run both the interpreted and the compiled kernels. Two lanes, the same test bodies:

  interpreter lane (default, ``pytest tests``): ``TRITON_INTERPRET=1``; the ``device="cpu"`` params
      run (Triton kernels in the interpreter on CPU tensors), the ``device="cuda"`` params skip.
  CUDA lane (``MAE_FAST_TEST_DEVICE=cuda pytest tests``, or ``TRITON_INTERPRET=0``): Triton
      kernels compiled for the GPU; only tests marked ``cuda`` (the ``device="cuda"`` params and
      tests/test_cuda_*.py) run, every other test skips with a reason. Without a GPU they skip too.

A test joins both lanes by taking the ``device`` fixture (tests/conftest.py): the ``cuda`` param
runs its body with ``torch.device("cuda")`` as the default device (so ``torch.randn(...)`` in the
body makes CUDA tensors) and with TF32 off for the duration (see ``tf32_off``).
"""
import contextlib
import os

LANE_ENV = "MAE_FAST_TEST_DEVICE"


def _lane() -> str:
    asked = os.environ.get(LANE_ENV, "").strip().lower()
    if asked not in ("", "cpu", "cuda"):
        raise ValueError(f"{LANE_ENV} must be 'cpu' or 'cuda', got {asked!r}")
    if asked == "cuda" or (not asked and os.environ.get("TRITON_INTERPRET") == "0"):
        return "cuda"
    return "cpu"


LANE = _lane()
if LANE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, even if the shell exported 1
else:
    # backend="auto" never picks the interpreter on CPU (see mae_fast.backends); tests ask for
    # backend="fast"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET is settled)

CPU_LANE_ONLY = ("interpreter-lane test: plain `pytest tests` runs it (this process compiles "
                 "Triton kernels for CUDA: TRITON_INTERPRET=0)")
CUDA_LANE_ONLY = ("CUDA lane: run `MAE_FAST_TEST_DEVICE=cuda pytest tests` (or `make gpu-check`) on "
                  "a GPU machine; this process interprets Triton on CPU")
NO_GPU = f"{LANE_ENV}=cuda but torch.cuda.is_available() is False (no GPU visible to torch)"


def lane_device() -> torch.device:
    """The device whose Triton kernels this process can run: cuda in the CUDA lane, else cpu."""
    return torch.device(LANE)


def cuda_skip_reason():
    """Why a CUDA test cannot run in this process, or None when it can."""
    if LANE != "cuda":
        return CUDA_LANE_ONLY
    if not torch.cuda.is_available():
        return NO_GPU
    return None


@contextlib.contextmanager
def tf32_off():
    """IEEE fp32 for matmul and cuDNN (conv) inside the block, restored after.

    torch's defaults on Ampere and newer: matmul fp32 is IEEE (``allow_tf32=False``) but cuDNN
    convolutions use TF32 (``cudnn.allow_tf32=True``), so the reference's ``F.conv2d`` patch embed
    would round fp32 inputs to 10 mantissa bits while the fused kernels use
    ``tl.dot(..., input_precision="ieee")``. fp32 parity is only meaningful with both off."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@contextlib.contextmanager
def on_device(device: torch.device):
    """The body of a lane test on ``device``: CUDA is the default device for factory calls
    (``torch.randn(...)``) and TF32 is off; CPU changes nothing."""
    if device.type != "cuda":
        yield device
        return
    with torch.device(device), tf32_off():
        yield device
