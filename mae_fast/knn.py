"""A kNN monitor: how well the encoder's features separate a labelled set, during pretraining.

``KnnMonitor(input_size)(model)`` -> held-out accuracy of a weighted k-nearest-neighbour vote
(cosine similarity of L2-normalised mean-pooled encoder features, weights ``exp(sim / T)``, k = 20,
T = 0.07, as in the InstDisc / DINO monitors) with the 75/25 stratified split of the linear probe.
Data: scikit-learn's digits as the probe (``mae_fast.linprobe.digits_images``), or an ImageFolder
with class sub-folders (``--knn-data``). No training: one encoder pass over the images, so it is
cheap enough to run every few epochs (``mae-fast pretrain --knn-every N``).
"""
import numpy as np
import torch
import torch.nn.functional as F

from .linprobe import digits_images, encoder_features, folder_images


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """features (N, D) float, labels (N,) int64 -> accuracy of the weighted kNN vote on the test set."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)  # (Ntr, D)
    test = F.normalize(test_features.float(), dim=1)  # (Nte, D)
    k = min(k, train.shape[0])
    sim, idx = (test @ train.T).topk(k, dim=1)  # (Nte, k)
    weights = (sim / temperature).exp()  # (Nte, k)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_labels[idx], weights)  # (Nte, C)
    return float((votes.argmax(dim=1) == test_labels).float().mean())


class KnnMonitor:
    """Images and split made once; ``monitor(model)`` runs the encoder and returns the accuracy."""

    def __init__(self, input_size: int, data_path=None, seed: int = 0, k: int = 20, temperature: float = 0.07,
                 amp_dtype=None):
        from sklearn.model_selection import train_test_split
        imgs, labels = digits_images(input_size) if data_path is None else folder_images(data_path, input_size)
        self.name = "digits" if data_path is None else data_path
        order = np.arange(len(labels))
        train_idx, test_idx = train_test_split(order, test_size=0.25, random_state=seed, stratify=labels)
        self.imgs = imgs  # (N, 3, S, S)
        self.labels = torch.from_numpy(labels)
        self.train_idx, self.test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
        self.k, self.temperature, self.amp_dtype = k, temperature, amp_dtype

    def __call__(self, model) -> float:
        feats = torch.from_numpy(encoder_features(model, self.imgs, "mean", amp_dtype=self.amp_dtype))
        return knn_accuracy(feats[self.train_idx], self.labels[self.train_idx], feats[self.test_idx],
                            self.labels[self.test_idx], self.k, self.temperature)
