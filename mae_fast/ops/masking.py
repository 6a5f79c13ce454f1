"""Random-masking indices: computed once per step and shared by every op (encoder gather,
decoder unshuffle, loss).

Fast path: ``torch.ops.mae_fast.random_masking`` from the C++/CUDA extension ``mae_fast._C``
(``csrc/masking.cpp``, ``csrc/cuda/masking_kernels.cu``): one kernel computes ids_keep,
ids_restore and mask from the noise (the rank of every element in its row), instead of the
official argsort / argsort / slice / ones / fill / gather. The reference
(``mae_fast.reference.masking_indices``) is torch's own sorts.

Ties: the op breaks ties between equal noise values by index (``torch.argsort(noise,
stable=True)``); the official ``torch.argsort`` is not stable, so with ties the two may order
equal-noise patches differently (see docs/CUDA.md). NaN sorts as the largest value, as in torch.

The indices are not differentiable: noise that requires grad is detached (the reference's
outputs do not require grad either). This module gives the op its fake (shape) implementation.
"""
import functools

import torch

from .. import _ext, reference
from ..backends import choose, register_fast

OP = "random_masking"


register_fast(OP, "c++", functools.partial(_ext.probe, "random_masking"))


if _ext.has_op("random_masking"):

    @torch.library.register_fake("mae_fast::random_masking")
    def _random_masking_fake(noise, len_keep):
        torch._check(noise.dim() == 2, lambda: f"mae_fast.random_masking: noise must be (N, L), got {noise.dim()}-D")
        N, L = noise.shape
        torch._check(len_keep >= 0, lambda: f"mae_fast.random_masking: len_keep = {len_keep} must be >= 0")
        torch._check(len_keep <= L, lambda: f"mae_fast.random_masking: len_keep = {len_keep} must be <= L = {L}")
        ids_keep = noise.new_empty((N, len_keep), dtype=torch.int64)
        ids_restore = noise.new_empty((N, L), dtype=torch.int64)
        mask = noise.new_empty((N, L), dtype=torch.float32)
        return ids_keep, ids_restore, mask


def _masking_cpp(noise, len_keep):
    ids_keep, ids_restore, mask = torch.ops.mae_fast.random_masking(noise.detach().contiguous(), len_keep)
    # the official mask is torch.ones(...) in the default dtype; the op writes float32
    default_dtype = torch.get_default_dtype()
    if mask.dtype != default_dtype:
        mask = mask.to(default_dtype)
    return ids_keep, ids_restore, mask


# The op ranks every element against its whole row: O(L^2) work per row (and, on CUDA, one row's
# keys in one block's shared memory), against the argsort path's O(L log L). Rows longer than this
# run the argsort path (the reference), for backend "auto" and "fast" alike: past the crossover
# it *is* the fast path, and the op is never handed a row it refuses. docs/CUDA.md ("Long rows")
# has the measurement (CPU) and the arithmetic (CUDA, an estimate: not measured on a GPU).
RANK_MAX_L = {"cpu": 1024, "cuda": 1024}


def rank_kernel_runs(device: torch.device, L: int) -> bool:
    """Whether the rank kernel takes rows of length ``L`` on ``device`` (meta: shapes only, any L)."""
    return device.type == "meta" or L <= RANK_MAX_L.get(device.type, 0)


def masking_indices(noise, len_keep: int, *, backend="auto"):
    """noise (N, L) -> ids_keep (N, len_keep) int64, ids_restore (N, L) int64, mask (N, L) in the
    default float dtype, 1 = removed."""
    choice = choose(OP, noise.device, backend)
    if choice.impl == "c++" and (noise.dim() != 2 or rank_kernel_runs(noise.device, noise.shape[1])):
        return _masking_cpp(noise, len_keep)  # (a noise of another rank: the op's clear error)
    return reference.masking_indices(noise, len_keep)
