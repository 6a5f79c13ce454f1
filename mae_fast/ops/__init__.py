"""One public function per op. Each picks its implementation through ``mae_fast.backends``
(the one dispatch point) and owns its autograd; ``mae_fast.reference`` is the oracle."""
from .. import attention as _attention  # noqa: F401  (registers the attention chooser)
from .layernorm import add_layer_norm, add_norm
from .loss import masked_loss, masked_loss_rows
from .masking import masking_indices
from . import mlp as _mlp  # noqa: F401  (registers the opt-in MLP GEMM chooser)
from .patch_embed import patch_embed_masked
from .unshuffle import unshuffle, unshuffle_subset

__all__ = ["masking_indices", "patch_embed_masked", "unshuffle", "masked_loss", "add_layer_norm", "add_norm",
           "unshuffle_subset", "masked_loss_rows"]
