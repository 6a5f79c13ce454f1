"""The tiny contrastive MAE and the fixed global batch shared by tests/test_contrastive.py and its
DDP rank script (32 px images, 8 px patches: L = 16; width 32, depth 1)."""
import torch

from mae_fast import ContrastiveMAE, MaskedAutoencoderViT

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
GLOBAL_BATCH = 6


def tiny_plain_model(seed: int = 0, **kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**TINY, **kwargs)


def tiny_contrastive_model(seed: int = 0, **contrastive) -> ContrastiveMAE:
    torch.manual_seed(seed)
    model = ContrastiveMAE(**TINY, **contrastive)
    return model


def global_batch(n: int = GLOBAL_BATCH):
    """imgs (n, 2, 3, 32, 32), noise (n, 2, 16), the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, 2, 3, 32, 32, generator=g), torch.rand(n, 2, 16, generator=g)
