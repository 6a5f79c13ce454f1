"""Decoder input: unshuffle-scatter of kept tokens and mask tokens into the full sequence,
plus the decoder positional table."""
from .. import reference
from ..backends import choose, register_fast

OP = "unshuffle"
register_fast(OP, "c++", lambda device: (False, "the _C op is not written yet"))


def unshuffle(x, mask_token, ids_restore, pos_embed=None, *, backend="auto"):
    """x (N, 1+K, D); mask_token (1, 1, D); ids_restore (N, L); pos_embed (1, 1+L, D) or None
    -> (N, 1+L, D)."""
    choose(OP, x.device, backend)
    return reference.unshuffle(x, mask_token, ids_restore, pos_embed)
