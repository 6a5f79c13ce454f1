"""Decoder input at MAE-Base decoder shapes (N=64, L=196, len_keep=49, D=512, fp32, CPU):
the C++ op ``torch.ops.mae_fast.unshuffle_scatter`` against the official sequence
(repeat, cat, gather, cat, + pos), forward alone and forward + backward, as the model calls it
(``decoder_pos_embed`` frozen, ``x`` and ``mask_token`` requiring grad).

    .venv/bin/python -m pytest benchmarks/test_bench_unshuffle.py -q

Results and the machine they came from: docs/CUDA.md.
"""
import pytest
import torch

from mae_fast import _ext
from mae_fast.ops.unshuffle import unshuffle

N, L, K, D = 64, 196, 49, 512
IMPLS = ["reference", "c++"]
BACKEND = {"reference": "reference", "c++": "fast"}


def _skip_without_ext(impl):
    if impl == "c++" and not _ext.has_op("unshuffle_scatter"):
        pytest.skip(f"mae_fast._C has no unshuffle_scatter op: {_ext.how_obtained()}")


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1 + K, D, generator=g, requires_grad=True)
    mask_token = torch.randn(1, 1, D, generator=g, requires_grad=True)
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, generator=g), dim=1), dim=1)
    pos = torch.randn(1, 1 + L, D, generator=g)  # frozen, as decoder_pos_embed
    grad_out = torch.randn(N, 1 + L, D, generator=g)
    return x, mask_token, ids_restore, pos, grad_out


@pytest.mark.benchmark(group=f"unshuffle forward N={N} L={L} K={K} D={D} fp32 cpu")
@pytest.mark.parametrize("impl", IMPLS)
def test_unshuffle_forward(benchmark, inputs, impl):
    _skip_without_ext(impl)
    x, mask_token, ids_restore, pos, _ = inputs

    def step():
        with torch.no_grad():
            return unshuffle(x, mask_token, ids_restore, pos, backend=BACKEND[impl])

    out = benchmark(step)
    assert out.shape == (N, 1 + L, D)


@pytest.mark.benchmark(group=f"unshuffle forward+backward N={N} L={L} K={K} D={D} fp32 cpu")
@pytest.mark.parametrize("impl", IMPLS)
def test_unshuffle_forward_backward(benchmark, inputs, impl):
    _skip_without_ext(impl)
    x, mask_token, ids_restore, pos, grad_out = inputs

    def step():
        x.grad = mask_token.grad = None
        out = unshuffle(x, mask_token, ids_restore, pos, backend=BACKEND[impl])
        out.backward(grad_out)
        return x.grad, mask_token.grad

    grad_x, grad_mask_token = benchmark(step)
    assert grad_x.shape == x.shape and grad_mask_token.shape == mask_token.shape
