"""MAE weights between mae_fast / official MAE, Hugging Face ``ViTMAEForPreTraining`` and timm
``VisionTransformer``.

* ``from_hf(src)``: an HF directory (``config.json`` + ``model.safetensors`` / sharded /
  ``pytorch_model.bin``) or an HF model instance -> ``MaskedAutoencoderViT``. Reading a
  directory needs only ``safetensors`` (no transformers).
* ``to_hf(model, out_dir)``: a directory ``ViTMAEForPreTraining.from_pretrained`` loads (needs
  transformers).
* ``to_timm(model)``: the encoder as a state_dict for ``timm.models.vision_transformer
  .VisionTransformer(**timm_kwargs(model))`` (num_classes=0); the decoder is dropped.
* ``model_from_state_dict(sd, args)``: an official / mae_fast / safetensors state_dict -> the
  model it fits (architecture from shapes, the checkpoint's args or metadata).

Every function that maps weights returns / fills a ``ConversionReport`` (what was mapped,
dropped, interpolated). Errors name the file and the key. Optional packages are imported where
they are needed (``mae_fast.checkpoint.optional_import``: the error names the pip command).
"""
import argparse
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .checkpoint import (checkpoint_args, is_safetensors, load_official_checkpoint, optional_import,
                         read_checkpoint, read_state_dict, save_state_dict)
from .model import MaskedAutoencoderViT


@dataclass
class ConversionReport:
    mapped: List[str] = field(default_factory=list)        # "src -> dst" lines
    dropped: List[str] = field(default_factory=list)       # source keys with no destination
    interpolated: List[str] = field(default_factory=list)  # positional tables resized
    notes: List[str] = field(default_factory=list)
    mask_ratio: Optional[float] = None                     # HF config's (mae_fast takes it per forward)

    def lines(self) -> List[str]:
        out = [f"mapped: {len(self.mapped)} tensors"]
        packed = [m for m in self.mapped if "query" in m or "q_proj" in m]
        if packed:
            out.append(f"  q/k/v packed into / split from qkv in {len(packed)} attention weights+biases")
        if self.dropped:
            out.append(f"dropped: {len(self.dropped)} tensors: {_summarise(self.dropped)}")
        else:
            out.append("dropped: nothing")
        out.append(f"interpolated: {', '.join(self.interpolated) if self.interpolated else 'nothing'}")
        out += [f"note: {n}" for n in self.notes]
        return out


def _summarise(keys: List[str]) -> str:
    """Group ``blocks.3.x`` style keys: {'decoder_blocks.*': 12, 'mask_token': 1}."""
    groups: Dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+\..*$", ".*", k)
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


# ---------------------------------------------------------------------------------------------
# architecture of a MaskedAutoencoderViT: one dict, read from a model, built into a model
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "mlp_ratio", "layer_norm_eps", "norm_pix_loss")


def architecture(model: MaskedAutoencoderViT) -> dict:
    """The constructor arguments that rebuild ``model`` (``layer_norm_eps`` for ``norm_layer``)."""
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"expected a mae_fast MaskedAutoencoderViT, got {type(model).__name__}")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise ValueError(f"the model's LayerNorms have different eps {sorted(eps)}: no single layer_norm_eps")
    embed_dim, dec_dim = model.cls_token.shape[-1], model.mask_token.shape[-1]
    mlp = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 4 * embed_dim
    return dict(img_size=list(model.patch_embed.img_size), patch_size=model.patch_size, in_chans=model.in_chans,
                embed_dim=embed_dim, depth=len(model.blocks),
                num_heads=model.blocks[0].attn.num_heads if len(model.blocks) else 1,
                decoder_embed_dim=dec_dim, decoder_depth=len(model.decoder_blocks),
                decoder_num_heads=model.decoder_blocks[0].attn.num_heads if len(model.decoder_blocks) else 1,
                mlp_ratio=mlp / embed_dim, layer_norm_eps=eps.pop(), norm_pix_loss=bool(model.norm_pix_loss))


def build_model(arch: dict, **kwargs) -> MaskedAutoencoderViT:
    """``MaskedAutoencoderViT`` from an ``architecture`` dict (kwargs: backend, attn_backend)."""
    a = dict(arch)
    eps = a.pop("layer_norm_eps")
    img = a.pop("img_size")
    return MaskedAutoencoderViT(img_size=tuple(img) if isinstance(img, (list, tuple)) else img,
                                norm_layer=partial(nn.LayerNorm, eps=eps),
                                **{k: a[k] for k in ARCH_KEYS if k in a}, **kwargs)


# official widths -> heads (mae_vit_{base,large,huge}: the encoder; every official decoder: 512 / 16)
OFFICIAL_HEADS = {768: 12, 1024: 16, 1280: 16}
OFFICIAL_DECODER_HEADS = {512: 16}


def _named_factory(name):
    """A model factory by its name in mae_fast.model or mae_fast.pretrain's list (None if unknown)."""
    from . import model as model_module
    if isinstance(name, str) and name.startswith("mae_vit_") and hasattr(model_module, name):
        return getattr(model_module, name)
    try:
        from . import pretrain
        entry = getattr(pretrain, "MODELS", {}).get(name)
        return entry[0] if entry else None
    except Exception:  # the trainer may not import here (optional deps): fall back to shapes
        return None


def _count_blocks(sd, prefix):
    idx = {int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(prefix)}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def model_from_state_dict(sd: dict, args: Optional[dict] = None, *, source: str = "the checkpoint",
                          img_size=None, num_heads=None, decoder_num_heads=None, layer_norm_eps=None,
                          norm_pix_loss=None, encoder_only: bool = False) -> MaskedAutoencoderViT:
    """The ``MaskedAutoencoderViT`` an official / mae_fast state_dict fits, weights not loaded.

    Widths, depths, patch size, channels and MLP ratio come from the tensor shapes. What shapes
    do not say: ``args`` of the checkpoint (a mae_fast ``architecture`` dict, as ``convert``
    writes into safetensors metadata / ``args``; or ``model`` naming a factory plus
    ``input_size``, as official and mae_fast training checkpoints have), else the official
    defaults (heads of the official widths, eps 1e-6, square image from ``pos_embed``); keyword
    arguments override. ValueError names the source and the key when the dict is not an MAE's."""
    args = dict(args or {})
    arch = {k: args[k] for k in ARCH_KEYS if k in args}
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight"] + ([] if encoder_only else ["decoder_embed.weight"])
    for k in need:
        if k not in sd:
            raise ValueError(f"{source} is not an MAE state_dict: no {k!r} (it has {sorted(sd)[:6]} ...)")
    D, C, p, p2 = sd["patch_embed.proj.weight"].shape
    depth = _count_blocks(sd, "blocks")
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise ValueError(f"{source} is not an MAE state_dict: no 'blocks.0.mlp.fc1.weight'")
    factory = _named_factory(args.get("model"))
    if factory is not None and "num_heads" not in arch:
        with torch.device("meta"):  # no memory, no init cost: only heads and eps are read off it
            ref = factory(img_size=p * 2)
        for k, v in architecture(ref).items():
            if k in ("num_heads", "decoder_num_heads", "layer_norm_eps"):
                arch.setdefault(k, v)
    arch.update(patch_size=p, in_chans=C, embed_dim=D, depth=depth,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)
    if encoder_only:  # the official decoder (512 wide, 8 blocks, 16 heads) at init, unless args say
        arch.setdefault("decoder_embed_dim", 512)
        arch.setdefault("decoder_depth", 8)
    else:
        arch.update(decoder_embed_dim=sd["decoder_embed.weight"].shape[0], decoder_depth=_count_blocks(sd, "decoder_blocks"))
    if img_size is None and "img_size" not in arch:
        if isinstance(args.get("input_size"), int):
            img_size = args["input_size"]
        else:
            L = sd["pos_embed"].shape[1] - 1
            side = math.isqrt(L)
            if side * side != L:
                raise ValueError(f"{source}: pos_embed has {L} patch rows, not a square grid: pass img_size=(h, w)")
            img_size = side * p
    if img_size is not None:
        arch["img_size"] = list(img_size) if isinstance(img_size, (list, tuple)) else [img_size, img_size]
    for key, value, table, width in (("num_heads", num_heads, OFFICIAL_HEADS, D),
                                     ("decoder_num_heads", decoder_num_heads, OFFICIAL_DECODER_HEADS,
                                      arch["decoder_embed_dim"])):
        if value is not None:
            arch[key] = value
        elif key not in arch:
            if key == "decoder_num_heads" and arch["decoder_depth"] == 0:
                arch[key] = 1
            elif width in table:
                arch[key] = table[width]
            else:
                raise ValueError(f"{source}: the number of heads of a {width}-wide transformer is not in "
                                 f"the weights, and that width is no official size: pass {key}= (CLI: "
                                 f"--{key.replace('_', '-')})")
    if layer_norm_eps is not None or "layer_norm_eps" not in arch:
        arch["layer_norm_eps"] = 1e-6 if layer_norm_eps is None else layer_norm_eps
    if norm_pix_loss is not None or "norm_pix_loss" not in arch:
        arch["norm_pix_loss"] = bool(args.get("norm_pix_loss", False) if norm_pix_loss is None else norm_pix_loss)
    try:
        return build_model(arch)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def load_mae(path, *, kind: Optional[str] = None, **overrides):
    """(model, report) from a mae_fast / official ``.pth`` (training or weights), a ``.safetensors``
    file, a timm encoder state_dict (``kind="timm"``: the official decoder at init, reported) or an HF
    directory (``kind="hf"``). ``kind`` is guessed from ``path`` when None."""
    path = os.fspath(path)
    kind = kind or guess_kind(path)
    if kind == "hf":
        return from_hf(path, return_report=True)
    if kind not in ("official", "safetensors", "timm"):
        raise ValueError(f"unknown source kind {kind!r}; choose from hf, official, safetensors, timm")
    obj = read_checkpoint(path)
    sd = dict(read_state_dict(obj))
    args = checkpoint_args(obj)
    report = ConversionReport()
    if kind == "timm":
        for k in [k for k in sd if k.startswith(("head.", "fc_norm."))]:
            report.dropped.append(k)
            del sd[k]
    model = model_from_state_dict(sd, args, source=repr(path), encoder_only=(kind == "timm"), **overrides)
    model = model.to(sd["cls_token"].dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an encoder-only source is reported below, not warned
            loaded = load_official_checkpoint(model, sd, strict_decoder=(kind != "timm"))
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from e
    report.mapped = [f"{k} -> {k}" for k in sd if k in model.state_dict()]
    report.dropped += loaded.unexpected_keys + loaded.ignored_keys  # ignored: a contrastive projector
    report.interpolated = loaded.interpolated
    if loaded.missing_keys:
        report.notes.append(f"{len(loaded.missing_keys)} decoder tensors not in the source keep their init")
    return model, report


def guess_kind(path) -> str:
    """'hf' for a directory with config.json, 'safetensors' for *.safetensors, else 'official'."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise ValueError(f"{path!r} is a directory without config.json: not a Hugging Face model directory")
    return "safetensors" if is_safetensors(path) else "official"


# ---------------------------------------------------------------------------------------------
# Hugging Face ViTMAE: names
# Canonical names are the ones on the Hub (transformers 4.x files, also what 5.x writes for the
# encoder): vit.encoder.layer.N.attention.attention.query ... ; decoder.decoder_layers.N. ...
_HF_CANONICAL = [
    (r"^(embeddings|encoder|layers|layernorm)\.", r"vit.\1."),          # a ViTMAEModel's own keys
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),              # transformers 5 in memory
    (r"^decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1."),  # transformers 5 on disk
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
_HF_TOP = {  # mae_fast key -> canonical HF key
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_HF_BLOCK = {  # inside a block: mae_fast suffix -> HF suffix (qkv handled apart)
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_PREFIX = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}


def canonical_hf_key(key: str) -> str:
    for pattern, repl in _HF_CANONICAL:
        key = re.sub(pattern, repl, key)
    return key


def _hf_names(arch: dict):
    """[(mae_fast key, [canonical HF keys])]: one HF key each, three (q, k, v) for a qkv."""
    pairs = [(k, [v]) for k, v in _HF_TOP.items()]
    for ours, depth in (("blocks", arch["depth"]), ("decoder_blocks", arch["decoder_depth"])):
        for i in range(depth):
            src, dst = f"{ours}.{i}", f"{_HF_PREFIX[ours]}.{i}"
            for p in ("weight", "bias"):
                pairs.append((f"{src}.attn.qkv.{p}", [f"{dst}.{q}.{p}" for q in _HF_QKV]))
                pairs += [(f"{src}.{a}.{p}", [f"{dst}.{b}.{p}"]) for a, b in _HF_BLOCK.items()]
    return pairs


def arch_from_hf_config(config: dict, source: str = "config.json") -> dict:
    """mae_fast architecture from an HF ViTMAE config dict; ValueError names the config key
    for what mae_fast cannot express."""
    def get(key, default=None):
        if key not in config and default is None:
            raise ValueError(f"{source}: no {key!r}")
        return config.get(key, default)
    model_type = config.get("model_type")
    if model_type != "vit_mae":
        raise ValueError(f"{source}: model_type is {model_type!r} (architectures {config.get('architectures')}), "
                         "not 'vit_mae': not a ViTMAE model")
    img, patch = get("image_size", 224), get("patch_size", 16)
    img = list(img) if isinstance(img, (list, tuple)) else [img, img]
    patch = list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
    if patch[0] != patch[1]:
        raise ValueError(f"{source}: patch_size {patch} is not square: MAE needs square patches")
    hidden, dec_hidden = get("hidden_size", 768), get("decoder_hidden_size", 512)
    inter, dec_inter = get("intermediate_size", 3072), get("decoder_intermediate_size", 2048)
    mlp_ratio = inter / hidden
    if int(dec_hidden * mlp_ratio) != dec_inter:
        raise ValueError(f"{source}: decoder_intermediate_size {dec_inter} is not decoder_hidden_size * "
                         f"intermediate_size / hidden_size = {dec_hidden * mlp_ratio:g}: mae_fast has one mlp_ratio")
    act = get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: hidden_act is {act!r}; mae_fast's MLP uses exact GELU ('gelu')")
    heads = get("num_attention_heads", 12)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ValueError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}")
    return dict(img_size=img, patch_size=patch[0], in_chans=get("num_channels", 3), embed_dim=hidden,
                depth=get("num_hidden_layers", 12), num_heads=heads, decoder_embed_dim=dec_hidden,
                decoder_depth=get("decoder_num_hidden_layers", 8),
                decoder_num_heads=get("decoder_num_attention_heads", 16), mlp_ratio=mlp_ratio,
                layer_norm_eps=get("layer_norm_eps", 1e-12), norm_pix_loss=bool(get("norm_pix_loss", False)))


def hf_config_dict(arch: dict, mask_ratio: float = 0.75) -> dict:
    """HF ViTMAEConfig keyword arguments for a mae_fast architecture (square images only:
    ViTMAEForPreTraining's sin-cos init and patchify are square-only)."""
    h, w = arch["img_size"]
    if h != w:
        raise ValueError(f"img_size {h}x{w}: Hugging Face ViTMAEForPreTraining supports square images only "
                         "(its patchify raises on non-square pixel values)")
    return dict(image_size=h, patch_size=arch["patch_size"], num_channels=arch["in_chans"],
                hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["num_heads"],
                intermediate_size=int(arch["embed_dim"] * arch["mlp_ratio"]),
                decoder_hidden_size=arch["decoder_embed_dim"], decoder_num_hidden_layers=arch["decoder_depth"],
                decoder_num_attention_heads=arch["decoder_num_heads"],
                decoder_intermediate_size=int(arch["decoder_embed_dim"] * arch["mlp_ratio"]),
                layer_norm_eps=arch["layer_norm_eps"], hidden_act="gelu", qkv_bias=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                norm_pix_loss=arch["norm_pix_loss"], mask_ratio=mask_ratio)


def _read_hf_dir(path: str):
    """(config dict, state_dict, weights file name) of an HF model directory."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} has no config.json: not a Hugging Face model directory") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON ({e})") from e
    arch_from_hf_config(config, repr(cfg_path))  # the architecture check before reading weights
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    elif os.path.isfile(binary):
        files = [binary]
    else:
        raise FileNotFoundError(f"{path!r} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    sd = {}
    for file in files:
        sd.update(read_state_dict(read_checkpoint(file)) if not is_safetensors(file)
                  else read_checkpoint(file)["model"])
    return config, sd, files[0] if len(files) == 1 else index


def from_hf(src, *, strict_decoder: bool = True, return_report: bool = False, **model_kwargs):
    """``MaskedAutoencoderViT`` with the weights of a Hugging Face ``ViTMAEForPreTraining``.

    ``src``: a directory written by ``save_pretrained`` (or downloaded from the Hub), or a model
    instance (``ViTMAEForPreTraining``, or ``ViTMAEModel`` -- encoder only -- with
    ``strict_decoder=False``). The config maps image / patch size, channels, widths, depths,
    heads, MLP ratio, LayerNorm eps and norm_pix_loss; HF's ``mask_ratio`` is returned in the
    report (mae_fast takes it per ``forward``). q/k/v projections are packed into ``qkv``. The
    model has the weights' dtype. ``model_kwargs`` go to the constructor (backend, attn_backend).
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        config, hf_sd, weights_file = _read_hf_dir(path)
        source = repr(weights_file)
        cfg_source = repr(os.path.join(path, "config.json"))
    elif isinstance(src, nn.Module) and hasattr(src, "config"):
        config, hf_sd = src.config.to_dict(), src.state_dict()
        source = cfg_source = f"the {type(src).__name__} instance"
    else:
        raise TypeError(f"from_hf takes an HF model directory or a ViTMAE model instance, got {type(src).__name__}")
    arch = arch_from_hf_config(config, cfg_source)
    report = ConversionReport(mask_ratio=config.get("mask_ratio", 0.75))
    canonical = {}
    for k, v in hf_sd.items():
        canonical[canonical_hf_key(k)] = (k, v)
    model = build_model(arch, **model_kwargs)
    own = model.state_dict()
    new_sd, used = {}, set()
    missing, zero_qkv_bias = [], 0
    for ours, theirs in _hf_names(arch):
        if not all(t in canonical for t in theirs):
            if ours.endswith("attn.qkv.bias") and not config.get("qkv_bias", True) and \
                    not any(t in canonical for t in theirs):
                new_sd[ours] = torch.zeros_like(own[ours])  # qkv_bias=False == a zero bias
                zero_qkv_bias += 1
                continue
            missing.append(next(t for t in theirs if t not in canonical))
            continue
        tensors = [canonical[t][1] for t in theirs]
        value = torch.cat(tensors, dim=0) if len(tensors) == 3 else tensors[0]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise ValueError(f"{source}: {canonical[theirs[0]][0]} has shape {tuple(tensors[0].shape)}, "
                             f"which does not fit {ours} {tuple(own[ours].shape)} of the model {cfg_source} describes")
        new_sd[ours] = value
        used.update(theirs)
        report.mapped.append(f"{' + '.join(canonical[t][0] for t in theirs)} -> {ours}")
    if zero_qkv_bias:
        report.notes.append(f"qkv_bias=False: {zero_qkv_bias} qkv biases set to zero (the same function)")
    report.dropped = sorted(orig for c, (orig, _) in canonical.items() if c not in used)
    for dropped in report.dropped:
        if not dropped.startswith(("decoder.", "vit.")):  # e.g. the classifier of a ViTForImageClassification
            raise ValueError(f"{source}: unexpected key {dropped!r}: not a ViTMAEForPreTraining state_dict")
    decoder_missing = [m for m in missing if m.startswith("decoder.")]
    if len(decoder_missing) != len(missing):
        raise ValueError(f"{source}: missing {[m for m in missing if not m.startswith('decoder.')][:4]} "
                         "for the model its config describes")
    if decoder_missing:
        msg = f"{source} has no decoder ({len(decoder_missing)} tensors, e.g. {decoder_missing[0]!r})"
        if strict_decoder:
            raise ValueError(msg + ": pass strict_decoder=False to convert the encoder only")
        report.notes.append(msg + "; the decoder keeps its random init")
    dtype = new_sd["cls_token"].dtype
    model = model.to(dtype)
    model.load_state_dict(new_sd, strict=False)
    return (model, report) if return_report else model


def hf_state_dict(model: MaskedAutoencoderViT) -> Dict[str, torch.Tensor]:
    """The model's weights under canonical (Hub) HF ViTMAE names, qkv split into q/k/v."""
    arch = architecture(model)
    sd = model.state_dict()
    out = {}
    for ours, theirs in _hf_names(arch):
        parts = sd[ours].chunk(3, dim=0) if len(theirs) == 3 else (sd[ours],)
        out.update(zip(theirs, (p.contiguous() for p in parts)))
    return out


def to_hf(model: MaskedAutoencoderViT, out_dir, *, mask_ratio: float = 0.75, overwrite: bool = False,
          report: Optional[ConversionReport] = None) -> str:
    """Write ``model`` as a Hugging Face ``ViTMAEForPreTraining`` directory (config.json +
    model.safetensors, via ``save_pretrained``) that ``from_pretrained`` loads with equal outputs.
    Needs transformers. Written into a temporary sibling directory, then renamed: on failure
    nothing is left; an existing non-empty ``out_dir`` is an error unless ``overwrite``."""
    transformers = optional_import("transformers", "transformers", "to_hf (Hugging Face ViTMAE)")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists and is not empty (pass overwrite=True)")
    arch = architecture(model)
    config = transformers.ViTMAEConfig(**hf_config_dict(arch, mask_ratio))
    dtype = model.cls_token.dtype
    hf = transformers.ViTMAEForPreTraining(config).to(dtype)
    canonical_sd = hf_state_dict(model)
    target = {}
    for k in hf.state_dict():
        c = canonical_hf_key(k)
        if c not in canonical_sd:
            raise ValueError(f"transformers {transformers.__version__}: ViTMAEForPreTraining key {k!r} "
                             f"(canonical {c!r}) has no mae_fast counterpart")
        target[k] = canonical_sd[c]
    hf.load_state_dict(target, strict=True)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp.", dir=parent)
    try:
        hf.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if report is not None:
        report.mapped += [f"{o} -> {' + '.join(t)}" for o, t in _hf_names(arch)]
        report.mask_ratio = mask_ratio
    return out_dir


# ---------------------------------------------------------------------------------------------
# timm
_TIMM_DROP = ("decoder_", "mask_token")


def timm_kwargs(model: MaskedAutoencoderViT) -> dict:
    """``timm.models.vision_transformer.VisionTransformer(**timm_kwargs(model))`` is the encoder
    of ``model`` (no classifier: num_classes=0; LayerNorm eps as the model's)."""
    a = architecture(model)
    kw = dict(img_size=tuple(a["img_size"]), patch_size=a["patch_size"], in_chans=a["in_chans"],
              embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"],
              qkv_bias=True, num_classes=0)
    if a["layer_norm_eps"] != 1e-6:  # timm's default
        kw["norm_layer"] = partial(nn.LayerNorm, eps=a["layer_norm_eps"])
    return kw


def to_timm(model: MaskedAutoencoderViT, report: Optional[ConversionReport] = None) -> Dict[str, torch.Tensor]:
    """The encoder of ``model`` as a timm ``VisionTransformer`` state_dict (same names: cls_token,
    pos_embed, patch_embed, blocks.*, norm). The decoder and mask_token are dropped. No timm
    needed to convert; build the timm model with ``timm_kwargs(model)``."""
    architecture(model)  # a MaskedAutoencoderViT
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if not k.startswith(_TIMM_DROP)}
    if report is not None:
        report.mapped += [f"{k} -> {k}" for k in out]
        report.dropped += [k for k in sd if k.startswith(_TIMM_DROP)]
    return out


# ---------------------------------------------------------------------------------------------
# one call for the CLI
TARGETS = ("official", "hf", "timm", "safetensors")


def convert(src, dst, *, to: str, kind: Optional[str] = None, mask_ratio: Optional[float] = None,
            overwrite: bool = False, **overrides) -> ConversionReport:
    """Read ``src`` (kind guessed unless given: hf, official, safetensors, timm), write ``dst``
    as ``to``: official ({"model": sd, "args": architecture} .pth), safetensors (weights +
    architecture metadata), hf (directory), timm (encoder state_dict, .pth or .safetensors)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose from {', '.join(TARGETS)}")
    dst = os.fspath(dst)
    if to != "hf" and os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst!r} exists (pass overwrite=True / --overwrite)")
    model, report = load_mae(src, kind=kind, **overrides)
    arch = architecture(model)
    if mask_ratio is None:
        mask_ratio = report.mask_ratio if report.mask_ratio is not None else 0.75
    if to == "hf":
        report.mapped = []
        to_hf(model, dst, mask_ratio=mask_ratio, overwrite=overwrite, report=report)
    elif to == "timm":
        report.mapped = []
        sd = to_timm(model, report)
        save_state_dict(dst, sd, metadata={"timm_kwargs": {k: v for k, v in timm_kwargs(model).items()
                                                           if k != "norm_layer"}, **arch})
    else:
        if to == "safetensors" and not is_safetensors(dst):
            raise ValueError(f"--to safetensors writes a .safetensors file, got {dst!r}")
        if to == "official" and is_safetensors(dst):
            raise ValueError(f"--to official writes a .pth file, got {dst!r}")
        save_state_dict(dst, model.state_dict(), metadata=dict(arch, mask_ratio=mask_ratio))
    return report


__all__ = ["ConversionReport", "architecture", "build_model", "model_from_state_dict", "load_mae", "from_hf",
           "to_hf", "hf_state_dict", "to_timm", "timm_kwargs", "convert", "guess_kind", "canonical_hf_key"]


# ---------------------------------------------------------------------------------------------
# mae-fast convert
def main(argv=None) -> int:
    import sys
    p = argparse.ArgumentParser(
        prog="mae-fast convert",
        description="Convert MAE weights between mae_fast/official .pth, safetensors, Hugging Face "
                    "ViTMAEForPreTraining directories and timm VisionTransformer encoders.")
    p.add_argument("src", help="a .pth (official or mae_fast, weights or training checkpoint), a "
                               ".safetensors file, or an HF model directory")
    p.add_argument("dst", help="output file (.pth / .safetensors) or directory (--to hf)")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--from", dest="kind", default=None, choices=("official", "safetensors", "hf", "timm"),
                   help="source format (default: guessed from SRC: directory -> hf, *.safetensors -> "
                        "safetensors, else official)")
    p.add_argument("--img-size", type=int, nargs="+", default=None,
                   help="image size H [W] of the output model (positional tables are interpolated)")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads, for a non-official width")
    p.add_argument("--decoder-num-heads", type=int, default=None, help="decoder heads, for a non-official width")
    p.add_argument("--layer-norm-eps", type=float, default=None, help="default: from SRC, else 1e-6 (official)")
    p.add_argument("--mask-ratio", type=float, default=None, help="written into an HF config (default: "
                                                                  "SRC's, else 0.75)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("decoder_num_heads", args.decoder_num_heads),
                                   ("layer_norm_eps", args.layer_norm_eps)) if v is not None}
    if args.img_size is not None:
        if len(args.img_size) not in (1, 2):
            p.error("--img-size takes H or H W")
        overrides["img_size"] = args.img_size * (3 - len(args.img_size)) if len(args.img_size) == 1 else args.img_size
    kind = args.kind
    try:
        kind = kind or guess_kind(args.src)
        if kind == "hf" and overrides:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in overrides)}: not used with an "
                             "HF source (its config.json says everything)")
        if args.to == "hf":  # save_pretrained's progress bars would interleave with the report
            optional_import("transformers", "transformers", "--to hf").utils.logging.disable_progress_bar()
        report = convert(args.src, args.dst, to=args.to, kind=kind, mask_ratio=args.mask_ratio,
                         overwrite=args.overwrite, **overrides)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"mae-fast convert: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.src} ({kind}) -> {args.dst} ({args.to})")
    for line in report.lines():
        print(line)
    return 0
