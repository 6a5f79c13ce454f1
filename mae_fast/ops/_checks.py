"""Input checks shared by the fused ops."""
import torch


def check_ids(ids: torch.Tensor, num_patches: int, name: str, distinct: bool = False) -> None:
    """Values of ``ids`` (N, K) in [0, num_patches) (and distinct per row if asked). On CPU a
    ValueError; on CUDA a device-side assert (no host sync)."""
    if ids.numel() == 0:
        return
    lowest, highest = ids.aminmax()  # one reduction
    ok = (lowest >= 0) & (highest < num_patches)
    what = f"{name} values must lie in [0, {num_patches})"
    if distinct and ids.shape[1] > 1:
        ok = ok & (ids.sort(dim=1).values.diff(dim=1) != 0).all()
        what += " and be distinct in each row"
    if ids.device.type == "cpu":
        if not bool(ok):
            raise ValueError(what)
    else:
        torch._assert_async(ok, what)
