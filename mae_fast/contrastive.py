"""Contrastive MAE, CAN-style: ``ContrastiveMAE`` = ``MaskedAutoencoderViT`` + an InfoNCE term.

CAN (Mishra et al. 2022, "A simple, efficient and scalable contrastive masked autoencoder for
learning visual representations", arXiv 2210.16870) trains one ViT MAE on two augmented views of
every image, each masked independently (50 % of the patches per view), and adds a SimCLR InfoNCE
loss between the two views' encoder outputs to the MAE reconstruction loss. What this module does:

* two views per image (``imgs`` of shape ``(N, 2, C, H, W)``), each masked with its own noise at
  ``mask_ratio`` (default here 0.5, CAN's ratio per view); both views run through the encoder and
  the decoder as one batch of ``2N`` images;
* reconstruction: the official MAE loss on the removed patches of both views (their mean: every
  image removes the same number of patches, so this is the plain loss over the ``2N`` batch);
* contrastive: the encoder's output tokens of the visible patches (cls token left out) are
  mean-pooled, projected by ``contrastive_head`` (Linear(D, H) -> ReLU -> Linear(H, 128), the
  SimCLR v1 projection form without its BatchNorm, so the loss of a rank never depends on another
  rank's statistics; H = D by default), L2-normalised, and scored with SimCLR's NT-Xent at
  temperature 0.1 (CAN's): each of the ``2G`` projections of the global batch of ``G`` images is an
  anchor whose positive is the other view of its image and whose ``2G - 2`` negatives are every
  other projection of the *global* batch (the projections are all-gathered across DDP ranks with
  gradient, ``all_gather_with_grad``);
* total: ``reconstruction_weight * reconstruction + contrastive_weight * contrastive``, by default
  0.97 / 0.03, the weights CAN gives its MAE and InfoNCE terms.

Numbers followed: CAN's 50 % mask per view, temperature 0.1 and the 0.97 / 0.03 weighting (as the
issue reads the paper; the paper's full text could not be read from this machine, only its
abstract, which states the 50 % masking). Left out: CAN's third term, noise prediction (Gaussian
noise added to the visible patches and predicted by the decoder, with a noise-level embedding);
CAN's projector (a deeper MLP in the paper) is replaced by SimCLR v1's two-layer one; the two views
differ by independent RandomResizedCrop + flip draws (MAE's augmentation; SimCLR's colour
distortion is not applied).

``MaskedAutoencoderViT``'s contract is untouched: on 4-D images ``ContrastiveMAE.forward`` *is* the
plain MAE forward (``(loss, pred, mask)``; mask ratio 0.75 by default), so pictures, probes and
every caller of the drop-in work on it unchanged. State-dict keys are the official ones plus
``contrastive_head.*``; ``mae_fast.load_official_checkpoint`` loads such a file into a plain MAE
and reports the head's keys as ignored (``LoadReport.ignored_keys``).
"""
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CONTRASTIVE_HEAD_PREFIX
from .model import MaskedAutoencoderViT

HEAD_PREFIX = CONTRASTIVE_HEAD_PREFIX  # the projector's keys: contrastive_head.*
# CAN's recipe (see the module docstring)
DEFAULT_CONTRASTIVE_WEIGHT = 0.03
DEFAULT_TEMPERATURE = 0.1
DEFAULT_VIEW_MASK_RATIO = 0.5
DEFAULT_PROJECTION_DIM = 128  # SimCLR's output width


class ContrastiveOutput(NamedTuple):
    """What the two-view forward returns: the total ``loss`` (scalar), ``pred`` (N, 2, L, p*p*C),
    ``mask`` (N, 2, L) and the two weighted terms' unweighted values ``loss_rec``, ``loss_con``."""
    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    loss_rec: torch.Tensor
    loss_con: torch.Tensor


# ---------------------------------------------------------------------------------------------
# the global batch: all-gather with gradient
class _AllGatherWithGrad(torch.autograd.Function):
    """x (n, ...) on every rank -> (world * n, ...), rank-major. Backward: every rank's loss depends
    on every rank's rows, so the gradients of all ranks are summed (all-reduce) and each rank keeps
    the rows of its own ``x``. Then DDP's mean over ranks makes the parameter gradient that of the
    mean over ranks of the per-rank losses, i.e. of the global-batch loss."""

    @staticmethod
    def forward(ctx, x, group):
        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...), differentiable; ``x`` itself when not distributed.
    Every rank must pass the same shape (the trainer's batches are full: drop_last)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def _rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------
# the loss
def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
            group=None) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch.

    z_a, z_b: (n, P) projections of the two views of this rank's n images (not yet normalised).
    Every one of the 2n local projections is an anchor; its positive is the other view of its
    image, its negatives the other 2G - 2 projections of the global batch (G = n * world size,
    all-gathered with gradient). Cosine similarities divided by ``temperature``; returns the mean
    over the 2n local anchors of ``-log(exp(s_pos) / sum_{k != anchor} exp(s_k))`` (float32).
    Under DDP, the mean of this over the ranks is the loss of the global batch in one process."""
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (n, P), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(z_a.device.type, enabled=False):  # the similarities in float32 (float64 stays)
        return _nt_xent(z_a, z_b, temperature, group)


def _nt_xent(z_a, z_b, temperature, group):
    n = z_a.shape[0]
    dtype = torch.float64 if z_a.dtype == torch.float64 else torch.float32
    local = F.normalize(torch.stack([z_a, z_b]).to(dtype), dim=-1)  # (2, n, P): view, image
    gathered = all_gather_with_grad(local.transpose(0, 1).contiguous(), group)  # (G, 2, P), rank-major
    G = gathered.shape[0]
    candidates = gathered.transpose(0, 1).reshape(2 * G, -1)  # (2G, P): view a of all images, then view b
    anchors = local.reshape(2 * n, -1)  # (2n, P): view a of the local images, then view b
    logits = anchors @ candidates.T / temperature  # (2n, 2G)
    own = _rank(group) * n + torch.arange(n, device=logits.device)  # global image index of each local image
    self_col = torch.cat([own, own + G])  # (2n,) the anchor itself among the candidates
    pos_col = torch.cat([own + G, own])  # (2n,) the other view of its image
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=logits.device), self_col] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, pos_col)


# ---------------------------------------------------------------------------------------------
# the model
class ProjectionHead(nn.Sequential):
    """SimCLR v1's projection g(h) = W2 ReLU(W1 h) (no BatchNorm)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class ContrastiveMAE(MaskedAutoencoderViT):
    """MaskedAutoencoderViT + CAN's InfoNCE between two masked views (see the module docstring).

    Constructor: every ``MaskedAutoencoderViT`` argument, plus (keyword-only)
    ``contrastive_weight`` (0.03), ``reconstruction_weight`` (default ``1 - contrastive_weight``),
    ``temperature`` (0.1), ``projection_dim`` (128), ``projection_hidden_dim`` (default: the
    encoder width) and ``view_mask_ratio`` (0.5: the mask ratio of a two-view call without one).
    ``ContrastiveMAE.from_mae(model, ...)`` wraps an existing model (weights copied, so a run starts
    from exactly the plain model's initialisation).

    ``forward(imgs, mask_ratio=None, noise=None)``:
    * ``imgs`` (N, C, H, W): the plain MAE forward, ``(loss, pred, mask)`` (mask ratio default 0.75);
    * ``imgs`` (N, 2, C, H, W): two views per image -> ``ContrastiveOutput(loss, pred (N, 2, L, p*p*C),
      mask (N, 2, L), loss_rec, loss_con)``; ``noise`` (N, 2, L) or None; mask ratio default
      ``view_mask_ratio``.
    """

    def __init__(self, *args, contrastive_weight: float = DEFAULT_CONTRASTIVE_WEIGHT,
                 reconstruction_weight: Optional[float] = None, temperature: float = DEFAULT_TEMPERATURE,
                 projection_dim: int = DEFAULT_PROJECTION_DIM, projection_hidden_dim: Optional[int] = None,
                 view_mask_ratio: float = DEFAULT_VIEW_MASK_RATIO, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_contrastive(contrastive_weight, reconstruction_weight, temperature, view_mask_ratio)
        embed_dim = self.cls_token.shape[-1]
        if projection_dim < 1 or (projection_hidden_dim is not None and projection_hidden_dim < 1):
            raise ValueError(f"projection widths must be >= 1, got {projection_hidden_dim}, {projection_dim}")
        self.contrastive_head = ProjectionHead(embed_dim, projection_hidden_dim or embed_dim, projection_dim)
        self.contrastive_head.apply(self._init_weights)  # xavier_uniform, zero bias: as the MAE's linears

    def set_contrastive(self, contrastive_weight=DEFAULT_CONTRASTIVE_WEIGHT, reconstruction_weight=None,
                        temperature=DEFAULT_TEMPERATURE, view_mask_ratio=DEFAULT_VIEW_MASK_RATIO):
        """Check and set the loss weights, temperature and default mask ratio per view."""
        if reconstruction_weight is None:
            reconstruction_weight = 1.0 - contrastive_weight
        for name, value in (("contrastive_weight", contrastive_weight),
                            ("reconstruction_weight", reconstruction_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r} (reconstruction_weight "
                                 "defaults to 1 - contrastive_weight: give it for a contrastive_weight > 1)")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 <= view_mask_ratio < 1.0:
            raise ValueError(f"view_mask_ratio must be in [0, 1), got {view_mask_ratio}")
        self.contrastive_weight = float(contrastive_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.temperature = float(temperature)
        self.view_mask_ratio = float(view_mask_ratio)

    @classmethod
    def from_mae(cls, model: MaskedAutoencoderViT, **contrastive) -> "ContrastiveMAE":
        """A ContrastiveMAE with ``model``'s architecture, backends and weights (copied), plus a
        new projector (initialised from the global RNG after the copy)."""
        from .convert import architecture
        arch = architecture(model)
        eps = arch.pop("layer_norm_eps")
        img = arch.pop("img_size")
        out = cls(img_size=tuple(img), norm_layer=partial(nn.LayerNorm, eps=eps), backend=model.backend,
                  attn_backend=model.attn_backend, **arch, **contrastive)
        missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
        if unexpected or not all(k.startswith(HEAD_PREFIX) for k in missing):
            raise ValueError(f"from_mae: {type(model).__name__} does not rebuild as a ContrastiveMAE "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        out.set_grad_checkpointing(model.grad_checkpointing)
        return out.to(model.cls_token.device)

    def describe(self) -> str:
        """One line for run headers."""
        head = self.contrastive_head
        return (f"contrastive (CAN-style, mae_fast.ContrastiveMAE): loss {self.reconstruction_weight:g} x "
                f"reconstruction + {self.contrastive_weight:g} x InfoNCE (SimCLR NT-Xent, temperature "
                f"{self.temperature:g}, negatives: the other 2G-2 views of the global batch), two views per "
                f"image masked independently, projector {head[0].in_features}-{head[0].out_features}-"
                f"{head[2].out_features}")

    def forward(self, imgs, mask_ratio=None, noise=None):
        if isinstance(imgs, torch.Tensor) and imgs.dim() != 5:
            return super().forward(imgs, 0.75 if mask_ratio is None else mask_ratio, noise)
        return self.forward_two_views(imgs, self.view_mask_ratio if mask_ratio is None else mask_ratio, noise)

    def forward_two_views(self, imgs, mask_ratio, noise=None) -> ContrastiveOutput:
        """imgs (N, 2, C, H, W), noise (N, 2, L) or None -> ContrastiveOutput."""
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 5 or imgs.shape[1] != 2:
            raise ValueError(f"two-view images must be (N, 2, C, H, W), got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
        N, L = imgs.shape[0], self.patch_embed.num_patches
        both = imgs.transpose(0, 1).reshape(2 * N, *imgs.shape[2:])  # (2N, C, H, W): view 0 of all, then view 1
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (N, 2, L):
                raise ValueError(f"two-view noise must be (N, 2, L) = ({N}, 2, {L}), got "
                                 f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            noise = noise.transpose(0, 1).reshape(2 * N, L)  # (2N, L)
        latent, mask, ids_restore = self.forward_encoder(both, mask_ratio, noise)  # (2N, 1 + K, D)
        pred = self.forward_decoder(latent, ids_restore)  # (2N, L, p*p*C)
        # every image removes L - K patches: the loss over the 2N batch is the mean of the two views'
        loss_rec = self.forward_loss(both, pred, mask)
        z = self.contrastive_head(latent[:, 1:, :].mean(dim=1))  # (2N, P): mean of the visible tokens
        loss_con = nt_xent(z[:N], z[N:], self.temperature)
        loss = self.reconstruction_weight * loss_rec + self.contrastive_weight * loss_con
        return ContrastiveOutput(loss, pred.view(2, N, *pred.shape[1:]).transpose(0, 1),
                                 mask.view(2, N, L).transpose(0, 1), loss_rec, loss_con)
