"""Input checks shared by the fused ops, and the index contract they follow (docs/CUDA.md,
"Index contract"):

  * every kernel is memory-safe on *any* index value: an out-of-range entry of ``ids_keep`` /
    ``ids_restore`` is read as "no patch" (zeros, no write), never as an address;
  * CPU: the indices are always checked (no device to wait for) -> an error naming them;
  * CUDA: checked only with ``MAE_FAST_DEBUG=1``, which costs a host sync, -> the same error.
    By default nothing is checked on CUDA: no sync, no extra launches, and no device-side assert
    that would poison the process's CUDA context (and hang its DDP peers).
"""
import os

import torch


def debug_checks() -> bool:
    """MAE_FAST_DEBUG=1 (any value but "" and "0"): check indices on CUDA too."""
    return os.environ.get("MAE_FAST_DEBUG", "0") not in ("", "0")


def index_check_runs(device: torch.device) -> bool:
    """Whether the ops check their indices on tensors of ``device`` (see the module doc)."""
    if device.type == "cpu":
        return True
    return device.type != "meta" and debug_checks()


def check_ids(ids: torch.Tensor, num_patches: int, name: str, distinct: bool = False) -> None:
    """Values of ``ids`` (N, K) in [0, num_patches) (and distinct per row if asked) -> ValueError
    otherwise, where ``index_check_runs`` says so (always on CPU; on CUDA only with
    MAE_FAST_DEBUG=1, a host sync)."""
    if ids.numel() == 0 or not index_check_runs(ids.device):
        return
    lowest, highest = ids.aminmax()  # one reduction
    ok = bool((lowest >= 0) & (highest < num_patches))
    what = f"{name} values must lie in [0, {num_patches})"
    if distinct and ids.shape[1] > 1:
        ok = ok and bool((ids.sort(dim=1).values.diff(dim=1) != 0).all())
        what += " and be distinct in each row"
    if not ok:
        raise ValueError(what + (" (MAE_FAST_DEBUG check)" if ids.device.type != "cpu" else ""))
