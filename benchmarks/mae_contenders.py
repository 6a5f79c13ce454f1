"""The training-step contenders, shared by ``test_bench_train_step.py`` (pytest-benchmark) and
``interleaved.py`` (round-robin timing): one AdamW step (forward + backward + optimizer) of

  * ``mae_fast``            - mae_fast.MaskedAutoencoderViT, backend="auto";
  * ``mae_fast-reference``  - the same model, backend="reference" (the official op sequence);
  * ``mae_fast-gemm``       - the same model with ``MAE_FAST_MLP=gemm`` (the opt-in Triton GEMM
                              path: MLP epilogues, qkv dW + db in one launch, residual adds in the
                              proj / fc2 epilogues); not in CONTENDERS (asked for by name, e.g.
                              by tools/gpu_check.py), set and restored around its own steps;
  * ``hf-vitmae``           - transformers' ViTMAEForPreTraining with the same sizes (if installed);
  * ``official-timm``       - facebookresearch/mae models_mae.py from a local clone
                              (``--official-mae``), on the installed timm's Block (timm >= 0.9
                              runs its attention through SDPA: ``fused_attn``);
  * ``official-math``       - the same model with ``fused_attn = False``: timm 0.3.2's
                              softmax(q k^T) v, what the official code ran when it was published.

Never vendored: the official file is imported from the user's clone. Contenders that cannot run
here come back as ``Unavailable(reason)`` so pytest can skip with that reason.
"""
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

SIZES = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
    "vit_l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
}
CONTENDERS = ("mae_fast", "mae_fast-reference", "hf-vitmae", "official-timm", "official-math")
OPTIONAL_CONTENDERS = ("mae_fast-gemm",)  # built when asked for by name
MASK_RATIO = 0.75


@dataclass
class Unavailable:
    reason: str


@dataclass
class Contender:
    name: str
    model: nn.Module
    prepare: Callable[[], None]  # puts the shared model in this contender's mode
    step: Callable[[], torch.Tensor]  # one forward + backward + AdamW step; returns the loss
    note: str = ""


def sync(device: torch.device) -> None:
    """GPU work is timed to its end: every timed function calls this last."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    # the official recipe's betas and decay; one for every contender, so the step is the same work
    return torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def _make_step(model, loss_of, imgs, device) -> Callable[[], torch.Tensor]:
    opt = _adamw(model)

    def step():
        loss = loss_of(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)  # GPU work is timed to its end
        return loss.detach()

    return step


def images(size: str, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    s = SIZES[size]["img_size"]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, s, s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def norm_layer():
    return partial(nn.LayerNorm, eps=1e-6)


# ---- mae_fast ---------------------------------------------------------------------------------

def build_mae_fast(size, imgs) -> Dict[str, Contender]:
    from mae_fast.model import MaskedAutoencoderViT

    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**SIZES[size], norm_layer=norm_layer(), backend="auto")
    model = model.to(device=imgs.device, dtype=imgs.dtype)
    step = _make_step(model, lambda x: model(x, mask_ratio=MASK_RATIO)[0], imgs, imgs.device)

    users_mlp = os.environ.get("MAE_FAST_MLP")  # the caller's setting, restored for the others

    def mode(backend, mlp=users_mlp):
        def prepare():
            if mlp is None:
                os.environ.pop("MAE_FAST_MLP", None)
            else:  # read per call by mae_fast.backends.choose (the env is in its cache key)
                os.environ["MAE_FAST_MLP"] = mlp
            model.backend = backend
            model.set_attn_backend(None)  # follows backend: auto -> fused, reference -> math
        return prepare

    mode("auto")()
    choices = ", ".join(f"{op}={c.impl}" for op, c in model.backend_choices().items())
    return {
        "mae_fast": Contender("mae_fast", model, mode("auto"), step, f"backend=auto ({choices})"),
        "mae_fast-reference": Contender("mae_fast-reference", model, mode("reference"), step,
                                        "backend=reference (official op sequence, math attention)"),
        "mae_fast-gemm": Contender("mae_fast-gemm", model, mode("auto", "gemm"), step,
                                   "backend=auto, MAE_FAST_MLP=gemm (opt-in Triton GEMMs; Triton "
                                   "runs on CUDA only: elsewhere this is mae_fast)"),
    }


# ---- Hugging Face -----------------------------------------------------------------------------

def build_hf(size, imgs) -> Union[Contender, Unavailable]:
    try:
        import transformers
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except Exception as e:  # not installed, or broken
        return Unavailable(f"transformers is not importable ({type(e).__name__}: {e}); "
                           "pip install transformers to add ViTMAEForPreTraining")
    s = SIZES[size]
    cfg = ViTMAEConfig(
        image_size=s["img_size"], patch_size=s["patch_size"], num_channels=3,
        hidden_size=s["embed_dim"], num_hidden_layers=s["depth"], num_attention_heads=s["num_heads"],
        intermediate_size=int(s["embed_dim"] * s["mlp_ratio"]),
        decoder_hidden_size=s["decoder_embed_dim"], decoder_num_hidden_layers=s["decoder_depth"],
        decoder_num_attention_heads=s["decoder_num_heads"],
        decoder_intermediate_size=int(s["decoder_embed_dim"] * s["mlp_ratio"]),
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=MASK_RATIO,
        norm_pix_loss=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(cfg).to(device=imgs.device, dtype=imgs.dtype)
    model.train()
    attn = getattr(model.config, "_attn_implementation", "?")
    step = _make_step(model, lambda x: model(pixel_values=x).loss, imgs, imgs.device)
    return Contender("hf-vitmae", model, lambda: None, step,
                     f"transformers {transformers.__version__}, attn_implementation={attn}")


# ---- the official models_mae.py ---------------------------------------------------------------

def load_official_module(clone: Optional[str]):
    """models_mae from a local clone of facebookresearch/mae, or Unavailable(reason)."""
    if not clone:
        return Unavailable("pass --official-mae=/path/to/a/clone/of/facebookresearch/mae "
                           "(never vendored) to time the official models_mae.py")
    path = os.path.join(os.path.abspath(clone), "models_mae.py")
    if not os.path.isfile(path):
        return Unavailable(f"--official-mae={clone}: no models_mae.py there")
    try:
        import timm  # noqa: F401  (models_mae.py imports timm's PatchEmbed and Block)
    except Exception as e:
        return Unavailable(f"the official models_mae.py imports timm's Block; timm is not importable "
                           f"({type(e).__name__}: {e}); pip install timm")
    root = os.path.dirname(path)
    sys.path.insert(0, root)  # for its `from util.pos_embed import ...`
    try:
        spec = importlib.util.spec_from_file_location("official_models_mae", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:
        return Unavailable(f"importing {path} failed: {type(e).__name__}: {e}")
    finally:
        sys.path.remove(root)
    if "qk_scale" not in inspect.signature(module.Block.__init__).parameters:
        # timm >= 0.6 dropped Block's qk_scale; the official code passes qk_scale=None (= the
        # default head_dim ** -0.5), so dropping the keyword changes nothing
        timm_block = module.Block

        class Block(timm_block):
            def __init__(self, *args, qk_scale=None, **kwargs):
                if qk_scale is not None:
                    raise ValueError("this timm's Block has no qk_scale")
                super().__init__(*args, **kwargs)

        module.Block = Block
    return module


def build_official(size, imgs, clone) -> Union[Dict[str, Contender], Unavailable]:
    module = load_official_module(clone)
    if isinstance(module, Unavailable):
        return module
    import timm

    s = SIZES[size]
    torch.manual_seed(0)
    model = module.MaskedAutoencoderViT(**s, norm_layer=norm_layer()).to(device=imgs.device, dtype=imgs.dtype)
    step = _make_step(model, lambda x: model(x, mask_ratio=MASK_RATIO)[0], imgs, imgs.device)
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]

    def mode(fused):
        def prepare():
            for m in attns:
                m.fused_attn = fused
        return prepare

    out = {"official-math": Contender("official-math", model, mode(False), step,
                                      f"timm {timm.__version__}, fused_attn=False (timm 0.3.2's math attention)")}
    if attns:
        default = attns[0].fused_attn
        out["official-timm"] = Contender("official-timm", model, mode(default), step,
                                         f"timm {timm.__version__}, fused_attn={default} (timm's default)")
    else:  # an old timm: its attention is the math one
        out["official-timm"] = Unavailable(f"timm {timm.__version__} has no fused_attn switch "
                                           "(official-math is this timm's attention)")
    return out


def build_all(size: str, batch: int, device, dtype=torch.float32, official_clone=None,
              names=CONTENDERS) -> Dict[str, Union[Contender, Unavailable]]:
    imgs = images(size, batch, device, dtype)
    out: Dict[str, Union[Contender, Unavailable]] = {}
    if {"mae_fast", "mae_fast-reference", "mae_fast-gemm"} & set(names):
        out.update(build_mae_fast(size, imgs))
    if "hf-vitmae" in names:
        out["hf-vitmae"] = build_hf(size, imgs)
    if {"official-timm", "official-math"} & set(names):
        off = build_official(size, imgs, official_clone)
        if isinstance(off, Unavailable):
            out["official-timm"] = out["official-math"] = off
        else:
            out.update(off)
    return {n: out[n] for n in names if n in out}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
