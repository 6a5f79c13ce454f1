"""Masked reconstruction loss over removed patches, target built from the image."""
from .. import reference
from ..backends import choose, register_fast

OP = "masked_loss"
register_fast(OP, "triton", lambda device: (False, "the Triton kernel is not written yet"))


def masked_loss(imgs, pred, mask, patch_size: int, norm_pix_loss: bool, *, backend="auto"):
    """imgs (N, C, H, W); pred (N, L, p*p*C); mask (N, L), 1 = removed -> scalar."""
    choose(OP, imgs.device, backend)
    return reference.masked_loss(imgs, pred, mask, patch_size, norm_pix_loss)
