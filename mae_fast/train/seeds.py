"""Stateless randomness for exact resume.

The crop/flip of every sample and the mask noise of every step are drawn from seeds derived from
``(seed, epoch, index)`` and ``(seed, rank, step)``, never from a global generator, so a resumed run
sees the same images and masks as an uninterrupted one. The global RNG states are saved and
restored too (``rng_state`` / ``set_rng_state``), for anything else that draws from them.
"""
import random

import numpy as np
import torch


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return _derived_seed(seed, 1, epoch, index)


def mask_noise(seed: int, rank: int, step: int, n: int, num_patches: int, device) -> torch.Tensor:
    """noise (n, L) in [0, 1) for the masking of global iteration ``step`` on ``rank``."""
    g = torch.Generator(device=device)
    g.manual_seed(_derived_seed(seed, 2, rank, step))
    return torch.rand(n, num_patches, generator=g, device=device)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_process(seed: int) -> None:
    """The global generators of this process (per rank: ``seed + rank``), as the official."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
