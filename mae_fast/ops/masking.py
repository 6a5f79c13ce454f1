"""Random-masking indices: computed once per step and shared by every op (encoder gather,
decoder unshuffle, loss). Two argsorts over (N, L); torch's own sort is the implementation."""
from .. import reference


def masking_indices(noise, len_keep: int):
    """noise (N, L) -> ids_keep (N, len_keep), ids_restore (N, L), mask (N, L), 1 = removed."""
    return reference.masking_indices(noise, len_keep)
