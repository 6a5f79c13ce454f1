"""Two augmented views per sample, for the contrastive MAE (``mae-fast pretrain --contrastive-weight``).

``TwoViews(dataset)`` wraps a data set of the trainer (``BuiltinImages``, ``ImageFolder``): a
training key ``(index, sample_seed)`` gives ``(2, C, H, W)``, the image's training view drawn with
``sample_seed`` (the very sample a plain run gets) and a second one drawn with a seed derived from
it, so the views differ by independent RandomResizedCrop + flip draws and stay a function of the
key alone (exact resume, any number of workers). An ``int`` key gives the single evaluation view,
as the wrapped data set does (the reconstruction pictures use it).
"""
from typing import Tuple

import torch

from .seeds import _derived_seed

NUM_VIEWS = 2


def view_seed(sample_seed: int, view: int) -> int:
    """The crop/flip seed of ``view`` (0: the sample seed itself, as a plain run)."""
    return int(sample_seed) if view == 0 else _derived_seed(sample_seed, 3, view)


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, photo_names, faces, root, ... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def load(self, key) -> Tuple[torch.Tensor, tuple]:
        """(sample, bad files) as ``dataset.load``: (2, C, H, W) for a training key."""
        if not isinstance(key, (tuple, list)):
            return self.dataset.load(key)
        index, sample_seed = key
        views, bad = [], ()
        for v in range(NUM_VIEWS):
            img, bad_v = self.dataset.load((int(index), view_seed(sample_seed, v)))
            views.append(img)
            bad += tuple(bad_v)
        return torch.stack(views), bad

    def __getitem__(self, key):
        return self.load(key)[0]

    def preview_indices(self, n: int):
        return self.dataset.preview_indices(n)
