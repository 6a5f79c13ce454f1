"""pytest-benchmark options and fixtures for ``pytest benchmarks`` (kept out of ``make test``).

    pytest benchmarks -q --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
    pytest benchmarks -q --official-mae=/path/to/facebookresearch/mae --bench-size=vit_b16

GPU cases synchronise inside the timed function and skip with a reason without CUDA.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    g = parser.getgroup("mae_fast benchmarks")
    g.addoption("--official-mae", default=None, metavar="PATH",
                help="a local clone of facebookresearch/mae: adds its models_mae.py (needs timm)")
    g.addoption("--bench-size", default="vit_b16", choices=("tiny", "vit_b16", "vit_l16"),
                help="model size of the training-step benchmark (default vit_b16)")
    g.addoption("--bench-batch", type=int, default=8, help="training-step batch (default 8)")
    g.addoption("--bench-op-batch", type=int, default=8,
                help="batch of the per-op benchmarks (224 px images, ViT-B/16 widths; default 8)")
    g.addoption("--bench-rounds", type=int, default=3, help="timed rounds of a training step (default 3)")
    g.addoption("--bench-dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                help="dtype of the per-op inputs and of the training-step models (default fp32)")
    g.addoption("--bench-threads", type=int, default=0,
                help="torch.set_num_threads for CPU cases (default: torch's own)")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def dtype(request):
    return DTYPES[request.config.getoption("--bench-dtype")]


def pytest_configure(config):
    n = config.getoption("--bench-threads")
    if n:
        torch.set_num_threads(n)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: GPU timings are not measured")
    return torch.device(request.param)
