"""Encoder input: patchify + gather of the kept patches + patch-embed + positions + cls."""
from .. import reference
from ..backends import choose, register_fast, triton_probe

OP = "patch_embed_masked"
register_fast(OP, "triton", lambda device: (False, "the Triton kernel is not written yet"))


def patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, *, backend="auto"):
    """imgs (N, C, H, W); weight (D, C, p, p); bias (D,); pos_embed (1, 1+L, D);
    cls_token (1, 1, D); ids_keep (N, K) -> encoder tokens (N, 1+K, D)."""
    choose(OP, imgs.device, backend)
    return reference.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep)
