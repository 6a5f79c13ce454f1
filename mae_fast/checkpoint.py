"""Loading official MAE checkpoints (``{"model": state_dict}``) safely and loudly."""
import os
import warnings
from dataclasses import dataclass, field
from typing import List

import torch

from .pos_embed import interpolate_pos_embed

_POS_KEYS = ("pos_embed", "decoder_pos_embed")


@dataclass
class LoadReport:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return any(k.startswith(("decoder_", "mask_token")) for k in self.missing_keys)


def read_state_dict(path_or_state_dict):
    """A state_dict from a path (never unpickling arbitrary objects) or from a dict; accepts the
    official ``{"model": sd}`` wrapper."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        try:
            obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with non-tensor objects, or a corrupt file
            raise ValueError(f"could not load {os.fspath(path_or_state_dict)!r} as a weights-only "
                             f"checkpoint ({type(e).__name__}: {e})") from e
    else:
        obj = path_or_state_dict
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TypeError("checkpoint['model'] (or the checkpoint) must be a dict of tensors")
    return sd


def load_official_checkpoint(model, path_or_state_dict, *, strict_decoder: bool = True) -> LoadReport:
    """Load official MAE weights into ``model``.

    * positional tables of another image size are resized (official bicubic interpolation);
    * an encoder-only checkpoint (e.g. a fine-tuning release) raises unless
      ``strict_decoder=False``, which loads the encoder, warns, and reports the missing
      decoder keys: a decoder left at random init is never used silently;
    * shape mismatches raise with the key named.
    """
    sd = dict(read_state_dict(path_or_state_dict))
    report = LoadReport()
    own = model.state_dict()
    for k in _POS_KEYS:
        if k in sd and k in own and sd[k].shape != own[k].shape:
            sd[k] = interpolate_pos_embed(sd[k], model.patch_embed.grid_size)
            report.interpolated.append(k)
    for k, v in sd.items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"checkpoint {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    report.missing_keys = sorted(k for k in own if k not in sd)
    report.unexpected_keys = sorted(k for k in sd if k not in own)
    encoder_missing = [k for k in report.missing_keys if not k.startswith(("decoder_", "mask_token"))]
    if encoder_missing:
        raise ValueError(f"checkpoint lacks encoder weights: {encoder_missing[:8]}"
                         f"{' ...' if len(encoder_missing) > 8 else ''}")
    if report.missing_keys:
        msg = (f"checkpoint is encoder-only: {len(report.missing_keys)} decoder keys missing "
               f"({report.missing_keys[:4]} ...); the decoder keeps its random init")
        if strict_decoder:
            raise ValueError(msg + ". Pass strict_decoder=False to load the encoder anyway.")
        warnings.warn(msg, stacklevel=2)
    model.load_state_dict(sd, strict=False)
    return report
