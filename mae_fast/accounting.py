"""Bytes moved and ops launched by one MAE training step, counted on ``meta`` tensors (no device).

``python -m mae_fast.accounting`` prints, for ViT-B/16 and ViT-L/16 at batch 256, 224 px, bf16,
forward + backward, how many bytes the step reads + writes and how many ops it launches, split
into the glue (masking, encoder input, decoder input, loss), attention and the rest, for
mae_fast's fused path and for the official op sequence (``backend="reference"``, which runs
exactly the official ops), next to the analytic floor of the glue.

How it counts (``TrafficCounter``, a ``TorchDispatchMode``):
  * every op that reaches the dispatcher is one launch, and moves the bytes of its tensor inputs
    (read) plus its tensor outputs (written). A tensor's bytes are its distinct elements:
    broadcast (stride-0) dimensions count once, so ``cls_token.expand(N, ...)`` reads D values;
  * view ops (``OpOverload.is_view``, plus ``_unsafe_view``, ``detach``, ``alias``) and bare
    allocations (``empty*``) launch nothing and move nothing;
  * a fused custom op (``torch.ops.mae_fast.*``) reaches the mode as one op (its fake impl runs
    on meta); the reference reaches it as its aten sequence;
  * attention is counted at the function level (``mae_fast.attention.attend``): on meta SDPA
    decomposes into its math ops, so a fused backend (sdpa / xformers) is counted as one op
    moving q, k, v, out and the log-sum-exp forward, and one op moving q, k, v, out, dout, lse
    -> dq, dk, dv backward, the way a flash kernel does. The math backend (what the official
    timm 0.3.2 blocks run) is counted op by op, the materialised (B, H, M, M) scores included;
  * backward ops are attributed to the forward region whose autograd nodes run them (each
    region records the autograd sequence numbers it created).
An in-place op counts its mutated tensor as read and written; ``copy_`` counts its destination
as read too (an over-count of one tensor, the same for every path). These are counts of what
the ops address, not of DRAM traffic after caches: a model of it, the same for both paths.
"""
import argparse
import contextlib
import functools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = float(2 ** 30)

# regions of the step; the glue is the first four
GLUE = ("masking", "encoder input", "decoder input", "loss")
REGIONS = GLUE + ("attention", "rest")
PHASES = ("fwd", "bwd")

# ops that address no memory and launch nothing besides views
_NO_LAUNCH = {
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::_to_copy_meta_noop", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_same_storage_numel",
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: broadcast (stride-0) dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


def moves_nothing(func) -> bool:
    return bool(getattr(func, "is_view", False)) or func.name() in _NO_LAUNCH


@dataclass
class OpRecord:
    phase: str
    region: str
    op: str
    read: int
    written: int


@dataclass
class Tally:
    bytes: int = 0
    ops: int = 0

    def add(self, nbytes: int, nops: int) -> None:
        self.bytes += nbytes
        self.ops += nops


class TrafficCounter(TorchDispatchMode):
    """Counts bytes read + written and ops launched, per (phase, region).

    Use ``with counter:`` around the step, ``counter.phase = "fwd" | "bwd"`` to say which half
    runs, and ``counter.region(name)`` (or ``instrument_mae(counter)``) around the functions
    whose ops (and whose backward ops) belong to ``name``; everything else is "rest".
    """

    def __init__(self, keep_log: bool = False):
        super().__init__()
        self.tally: Dict[Tuple[str, str], Tally] = defaultdict(Tally)
        self.log: List[OpRecord] = []
        self.keep_log = keep_log
        self.phase = "fwd"
        self._stack: List[str] = []
        self._intervals: List[Tuple[int, int, str]] = []  # autograd seq numbers (lo, hi) -> region
        self._paused = 0

    # -- regions ------------------------------------------------------------------------------
    def _seq_marker(self) -> Optional[int]:
        """The autograd sequence number the next node would get (None when grad is off)."""
        if not torch.is_grad_enabled():
            return None
        self._paused += 1
        try:
            leaf = torch.empty((), device="meta", requires_grad=True)
            return leaf.view(()).grad_fn._sequence_nr()
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def region(self, name: str):
        lo = self._seq_marker()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            hi = self._seq_marker()
            if lo is not None and hi is not None:
                self._intervals.append((lo, hi, name))

    def _backward_region(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return "rest"
        seq = node._sequence_nr()
        best = None
        for lo, hi, name in self._intervals:  # innermost region: the latest start
            if lo < seq < hi and (best is None or lo > best[0]):
                best = (lo, name)
        return best[1] if best else "rest"

    def current_region(self) -> str:
        if self.phase == "bwd":
            return self._backward_region()
        return self._stack[-1] if self._stack else "rest"

    def add(self, region: str, op: str, read: int, written: int, nops: int = 1,
            phase: Optional[str] = None) -> None:
        phase = phase or self.phase
        self.tally[(phase, region)].add(read + written, nops)
        if self.keep_log:
            self.log.append(OpRecord(phase, region, op, read, written))

    # -- the mode -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or moves_nothing(func):
            return out
        region = self.current_region()
        if region == _SKIP:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not ins and not outs:  # dtype arithmetic (promote_types) and the like: no kernel
            return out
        read = sum(tensor_bytes(t) for t in ins)
        written = sum(tensor_bytes(t) for t in outs)
        self.add(region, func.name(), read, written)
        return out

    # -- results ------------------------------------------------------------------------------
    def total(self, regions=REGIONS, phases=PHASES) -> Tally:
        t = Tally()
        for (phase, region), v in self.tally.items():
            if phase in phases and region in regions:
                t.add(v.bytes, v.ops)
        return t


# a region whose ops are replaced by an analytic count (fused attention)
_SKIP = "<counted at the function level>"


def flash_attention_bytes(B: int, M: int, C: int, H: int, elem: int) -> Tuple[int, int]:
    """(forward, backward) bytes of a flash-style attention on q, k, v (B, M, C), H heads:
    forward reads q, k, v and writes out + the fp32 log-sum-exp (B, H, M); backward reads
    q, k, v, out, dout, lse and writes dq, dk, dv."""
    tok = B * M * C * elem
    lse = B * H * M * 4
    return 4 * tok + lse, 8 * tok + lse


@contextlib.contextmanager
def instrument_mae(counter: TrafficCounter):
    """Route mae_fast's glue functions and attention through ``counter``'s regions."""
    from . import attention, layers, model, ops

    patched = []

    def patch(obj, name, wrapper):
        patched.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, wrapper)

    def in_region(region, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with counter.region(region):
                return fn(*args, **kwargs)
        return wrapped

    original_attend = attention.attend

    @functools.wraps(original_attend)
    def counted_attend(qkv, num_heads, scale, *, backend="auto", return_attn=False, **kw):
        from .backends import choose
        impl = "math" if return_attn else choose("attention", qkv.device, backend).impl
        if impl == "math":  # the official op sequence: count its ops
            with counter.region("attention"):
                return original_attend(qkv, num_heads, scale, backend=backend,
                                       return_attn=return_attn, **kw)
        with counter.region(_SKIP):
            out = original_attend(qkv, num_heads, scale, backend=backend,
                                  return_attn=return_attn, **kw)
        B, M, C3 = qkv.shape
        fwd, bwd = flash_attention_bytes(B, M, C3 // 3, num_heads, qkv.element_size())
        counter.add("attention", f"fused attention ({impl})", fwd, 0)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: counter.add(
                "attention", f"fused attention backward ({impl})", bwd, 0, phase="bwd"))
        return out

    try:
        patch(ops, "masking_indices", in_region("masking", ops.masking_indices))
        patch(ops, "patch_embed_masked", in_region("encoder input", ops.patch_embed_masked))
        patch(ops, "unshuffle", in_region("decoder input", ops.unshuffle))
        patch(ops, "masked_loss", in_region("loss", ops.masked_loss))
        noise = model.MaskedAutoencoderViT.__dict__.get("_noise")  # draws the masking noise
        if isinstance(noise, staticmethod):
            patch(model.MaskedAutoencoderViT, "_noise",
                  staticmethod(in_region("masking", noise.__func__)))
        for mod in (layers, attention):
            if mod.__dict__.get("attend") is original_attend:
                patch(mod, "attend", counted_attend)
        yield counter
    finally:
        for obj, name, value in reversed(patched):
            setattr(obj, name, value)


# ---- one step on meta ------------------------------------------------------------------------

MODELS = {
    "vit_b16": "mae_vit_base_patch16",
    "vit_l16": "mae_vit_large_patch16",
    "vit_h14": "mae_vit_huge_patch14",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_meta_model(arch: str, backend: str, dtype: torch.dtype, **kwargs):
    """``arch``: a name of MODELS, a factory name of mae_fast.model, or a callable taking
    ``backend=`` (e.g. ``functools.partial(MaskedAutoencoderViT, embed_dim=...)``)."""
    from . import model as model_mod
    factory = arch if callable(arch) else getattr(model_mod, MODELS.get(arch, arch))
    with torch.device("meta"):
        mae = factory(backend=backend, **kwargs)
    return mae.to(dtype)


def count_step(mae, batch: int, mask_ratio: float = 0.75, keep_log: bool = False) -> TrafficCounter:
    """Forward + backward of ``mae`` (on meta) for one batch; returns the counter."""
    dtype = mae.cls_token.dtype
    H, W = mae.patch_embed.img_size
    imgs = torch.empty(batch, mae.in_chans, H, W, device="meta", dtype=dtype)
    counter = TrafficCounter(keep_log=keep_log)
    with instrument_mae(counter), counter:
        counter.phase = "fwd"
        loss, _pred, _mask = mae(imgs, mask_ratio=mask_ratio)
        counter.phase = "bwd"
        loss.backward()
    return counter


@dataclass
class GlueFloor:
    """The glue's compulsory traffic: the image read once, and every tensor the glue takes in or
    gives out (tokens, predictions and their gradients) read or written once."""
    terms: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.terms)


def glue_floor(mae, batch: int, mask_ratio: float = 0.75) -> GlueFloor:
    from .reference import num_keep
    e = mae.cls_token.element_size()
    C = mae.in_chans
    H, W = mae.patch_embed.img_size
    L = mae.patch_embed.num_patches
    K = num_keep(L, mask_ratio)
    D = mae.cls_token.shape[-1]
    Dd = mae.mask_token.shape[-1]
    P = mae.patch_size ** 2 * C
    N = batch
    return GlueFloor([
        ("image, read once", N * C * H * W * e),
        ("encoder tokens written (N, 1+K, D)", N * (1 + K) * D * e),
        ("decoder-embedded latent read (N, 1+K, Dd)", N * (1 + K) * Dd * e),
        ("decoder tokens written (N, 1+L, Dd)", N * (1 + L) * Dd * e),
        ("pred read (N, L, P)", N * L * P * e),
        ("grad pred written (N, L, P)", N * L * P * e),
        ("grad decoder tokens read (N, 1+L, Dd)", N * (1 + L) * Dd * e),
        ("grad latent written (N, 1+K, Dd)", N * (1 + K) * Dd * e),
        ("grad encoder tokens read (N, 1+K, D)", N * (1 + K) * D * e),
    ])


# ---- the table -------------------------------------------------------------------------------

PATHS = (("mae_fast", "fast"), ("official op sequence", "reference"))


def measure(arch: str, batch: int, dtype: torch.dtype, fast_backend: str = "fast",
            mask_ratio: float = 0.75, keep_log: bool = False, **model_kwargs):
    """{path name: counter} for mae_fast (``fast_backend``) and the official sequence."""
    results = {}
    for name, backend in (("mae_fast", fast_backend), ("official op sequence", "reference")):
        mae = build_meta_model(arch, backend, dtype, **model_kwargs)
        results[name] = count_step(mae, batch, mask_ratio, keep_log=keep_log)
    floor = glue_floor(build_meta_model(arch, "reference", dtype, **model_kwargs), batch, mask_ratio)
    return results, floor


def _gib(b: int) -> str:
    return f"{b / GIB:.3f}"


def table(arch: str, batch: int, dtype_name: str, fast_backend: str = "fast",
          mask_ratio: float = 0.75, **model_kwargs) -> str:
    dtype = DTYPES[dtype_name]
    results, floor = measure(arch, batch, dtype, fast_backend, mask_ratio, **model_kwargs)
    fast, off = results["mae_fast"], results["official op sequence"]
    arch_name = arch if isinstance(arch, str) else getattr(arch, "__name__", "custom")
    lines = [f"### {arch_name}, batch {batch}, {dtype_name}, mask ratio {mask_ratio}, forward + backward",
             "",
             "| region | mae_fast GiB | mae_fast ops | official GiB | official ops | bytes ratio | ops ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def row(label, regions):
        f, o = fast.total(regions), off.total(regions)
        br = f"{o.bytes / f.bytes:.2f}x" if f.bytes else "-"
        opr = f"{o.ops / f.ops:.2f}x" if f.ops else "-"
        lines.append(f"| {label} | {_gib(f.bytes)} | {f.ops} | {_gib(o.bytes)} | {o.ops} | {br} | {opr} |")

    for r in GLUE:
        row(f"glue: {r}", (r,))
    row("**glue total**", GLUE)
    row("attention", ("attention",))
    row("rest", ("rest",))
    row("**step total**", REGIONS)
    lines.append("")
    fg = fast.total(GLUE)
    lines.append(f"Glue floor (analytic): {_gib(floor.bytes)} GiB = "
                 + " + ".join(f"{name} {b / GIB:.4f}" for name, b in floor.terms) + ".")
    lines.append(f"mae_fast glue / floor: {fg.bytes / floor.bytes:.2f}x; "
                 f"official glue / floor: {off.total(GLUE).bytes / floor.bytes:.2f}x.")
    return "\n".join(lines)


def glue_ops_listing(counter: TrafficCounter) -> str:
    rows = [f"{r.phase} {r.region:14s} {r.op:48s} {(r.read + r.written) / 2**20:10.2f} MiB"
            for r in counter.log if r.region in GLUE]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mae_fast.accounting", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"], help=f"of {sorted(MODELS)}")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--fast-backend", choices=("fast", "auto"), default="fast",
                    help="mae_fast's backend on meta (default fast: every fused op, or an error)")
    ap.add_argument("--list-glue-ops", action="store_true", help="print every glue op of both paths")
    args = ap.parse_args(argv)
    for arch in args.models:
        print(table(arch, args.batch, args.dtype, args.fast_backend, args.mask_ratio))
        print()
        if args.list_glue_ops:
            results, _ = measure(arch, args.batch, DTYPES[args.dtype], args.fast_backend,
                                 args.mask_ratio, keep_log=True)
            for name, counter in results.items():
                print(f"#### glue ops, {name}\n```\n{glue_ops_listing(counter)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
