"""Random-masking indices at MAE's shapes (L=196 patches, len_keep=49, i.e. mask ratio 0.75;
N=64 and 256, fp32 noise from torch.rand): the C++ op ``torch.ops.mae_fast.random_masking``
(through ``mae_fast.ops.masking_indices(backend="fast")``) against the official sequence
(``mae_fast.reference.masking_indices``: argsort, argsort, slice, ones, fill, gather) and against
its two argsorts alone. CPU; the CUDA cases skip without a GPU.

    .venv/bin/python -m pytest benchmarks/test_bench_masking.py -q

Results and the machine they came from: docs/CUDA.md.
"""
import pytest
import torch

from mae_fast import _ext, reference
from mae_fast.ops.masking import masking_indices

L, LEN_KEEP = 196, 49
IMPLS = ["reference", "argsort x2", "c++"]


def two_argsorts(noise, len_keep):
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle[:, :len_keep], torch.argsort(ids_shuffle, dim=1)


FUNCTIONS = {
    "reference": reference.masking_indices,
    "argsort x2": two_argsorts,
    "c++": lambda noise, len_keep: masking_indices(noise, len_keep, backend="fast"),
}


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", [64, 256])
def test_masking_indices(benchmark, N, impl, device_type):
    if impl == "c++" and not _ext.has_op("random_masking"):
        pytest.skip(f"mae_fast._C has no random_masking op: {_ext.how_obtained()}")
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: GPU timings are not measured")
    benchmark.group = f"masking indices N={N} L={L} len_keep={LEN_KEEP} fp32 {device_type}"
    noise = torch.rand(N, L, generator=torch.Generator().manual_seed(0)).to(device_type)
    fn = FUNCTIONS[impl]

    def step():
        out = fn(noise, LEN_KEEP)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return out

    ids_keep = benchmark(step)[0]
    assert ids_keep.shape == (N, LEN_KEEP)
