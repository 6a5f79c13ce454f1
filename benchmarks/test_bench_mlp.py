"""The transformer MLP forward + backward, plain (cuBLAS nn.Linear + nn.GELU() + nn.Linear) against
the opt-in Triton GEMM epilogues (``MAE_FAST_MLP=gemm``, mae_fast.ops.mlp), at the ViT-B/16,
ViT-L/16, ViT-H/14 encoder and decoder widths, ``--bench-op-batch`` images (encoder 50 / 65 tokens,
decoder 197). CUDA only (the Triton path runs nowhere else outside the interpreter): without a GPU
every case skips. This is the measurement docs/PERFORMANCE.md "1d" says would decide the default.

    .venv/bin/python -m pytest benchmarks/test_bench_mlp.py -q --bench-dtype=bf16 --bench-op-batch=256
"""
import pytest
import torch

from mae_fast import backends
from mae_fast.layers import Mlp

# name -> (embed dim, hidden dim, tokens per image)
WIDTHS = {"vit_b16": (768, 3072, 50), "vit_l16": (1024, 4096, 50), "vit_h14": (1280, 5120, 65),
          "decoder": (512, 2048, 197)}


@pytest.mark.parametrize("mode", ["plain", "gemm"])
@pytest.mark.parametrize("width", list(WIDTHS))
def test_mlp_forward_backward(benchmark, width, mode, dtype, request, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: GPU timings are not measured")
    monkeypatch.setenv("MAE_FAST_MLP", mode)
    backends.clear_cache()
    C, H, T = WIDTHS[width]
    rows = request.config.getoption("--bench-op-batch") * T
    benchmark.group = f"mlp fwd+bwd {width} ({C}->{H}->{C}), {rows} rows, {dtype}, cuda"
    mlp = Mlp(C, H).to("cuda", dtype)
    mlp.backend = "fast"
    x = torch.randn(rows, C, device="cuda", dtype=dtype, requires_grad=True)
    grad_y = torch.randn(rows, C, device="cuda", dtype=dtype)

    def step():
        mlp(x).backward(grad_y)
        torch.cuda.synchronize()

    step()  # compile / autotune outside the timing
    benchmark(step)
    backends.clear_cache()
