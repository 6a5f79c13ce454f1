"""Self-attention for every encoder and decoder block: one function, three backends.

``attend(qkv, num_heads, scale)`` takes the qkv projection (B, M, 3*C) and returns (B, M, C),
C = H * K (H heads of K channels). Attention dropout is 0 (as in MAE) and ``scale`` is the
block's ``head_dim ** -0.5``.

Backends
  * ``xformers`` - ``xformers.ops.memory_efficient_attention`` on BMHK: the projection is viewed
    as (B, M, 3, H, K) and unbound, so q, k, v are strided views of it (no permute copies).
  * ``sdpa``     - ``torch.nn.functional.scaled_dot_product_attention`` on BHMK views.
  * ``math``     - ``mae_fast.reference.attention``: ``softmax((q @ k^T) * scale) @ v`` in timm
    0.3.2's order, the oracle and the only path that returns the attention weights
    (``return_attn=True``, or ``attention_maps(model, imgs)`` for a whole model).
  * ``auto``     - xformers when it imports, the tensors are on CUDA, torch is a CUDA (not a ROCm)
    build and xformers' own dispatcher accepts the inputs (dtype, head dim, GPU capability:
    asked per input signature, cached); otherwise sdpa. On ROCm (``torch.version.hip`` set) auto
    is sdpa, torch's own kernels, as the rest of mae_fast keeps to torch there
    (``mae_fast.backends``); an explicit ``xformers`` is still tried. Falling back never raises; it warns once per reason (not per call) when
    xformers is installed but cannot run (a broken import, or inputs its dispatcher rejects).
    An xformers that is simply not installed is the normal case of an optional extra: no warning,
    ``python -m mae_fast.info`` says so.

Who decides: an explicit backend (the model's ``attn_backend=`` keyword, or ``backend=`` here)
wins; otherwise ``MAE_FAST_ATTN=xformers|sdpa|math`` overrides ``auto``. An explicit backend that
cannot run is a ``RuntimeError`` that says why, never a silent fallback.

The device-level choice (is xformers importable, CUDA or not, env override) is made by the
chooser registered with ``mae_fast.backends`` and cached there; what depends on the input tensors
(xformers' acceptance of dtype / head dim / device) is decided here per call, from a small
cache keyed by the input signature, so a call costs a dict lookup.
"""
import os
import warnings
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from .backends import Choice, choose, register_chooser

ATTN_BACKENDS = ("auto", "xformers", "sdpa", "math")
# names the model's ``backend`` keyword may pass through: "reference" runs math, "fast" is auto
ALIASES = {"reference": "math", "fast": "auto"}
ENV = "MAE_FAST_ATTN"
INSTALL_HINT = "pip install --no-deps 'xformers==0.0.35' (see docs/ATTENTION.md)"


class AttentionBackendWarning(UserWarning):
    """Issued (once per reason) when ``auto`` falls back from xformers to sdpa."""


# ---------------------------------------------------------------------------------------------
# which backend: names, environment, xformers availability


def check_attn_backend(name: str) -> str:
    """Validate a backend name (or alias); returns the canonical name."""
    if not isinstance(name, str) or ALIASES.get(name, name) not in ATTN_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTN_BACKENDS} "
                         f"(or {tuple(ALIASES)}), got {name!r}")
    return ALIASES.get(name, name)


def _env_backend() -> Optional[str]:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if value not in ("xformers", "sdpa", "math"):
        raise ValueError(f"{ENV} must be one of xformers, sdpa, math (or unset), got {value!r}")
    return value


@lru_cache(maxsize=None)
def _load_xformers() -> Tuple[object, str, bool]:
    """-> (xformers.ops or None, why, installed). Imported once per process, only when needed."""
    try:
        import xformers  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "xformers":
            return None, f"xformers is not installed ({INSTALL_HINT})", False
        return None, f"xformers is installed but does not import ({type(e).__name__}: {e})", True
    except Exception as e:  # a broken install: missing .so, ABI mismatch, ...
        return None, f"xformers is installed but does not import ({type(e).__name__}: {e})", True
    try:
        import xformers.ops as xops
    except Exception as e:
        return None, f"xformers is installed but xformers.ops does not import ({type(e).__name__}: {e})", True
    version = getattr(xformers, "__version__", "?")
    if not getattr(xformers, "_has_cpp_library", True):
        # e.g. a wheel built for another torch: it imports (with a warning), but every one of its
        # CUDA operators then declines ("xFormers wasn't build with CUDA support")
        error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
        said = str(error).strip().splitlines()[0] if error else "unknown reason"
        return None, (f"xformers {version} imports but its C++/CUDA extension did not load ({said}): "
                      "install the xformers build made for this torch"), True
    return xops, f"xformers {version} imports", True


def _xformers_installed_hint() -> str:
    """Without importing it (slow; only CUDA needs it): is xformers there at all?"""
    import importlib.util
    try:
        found = importlib.util.find_spec("xformers") is not None
    except (ImportError, ValueError):
        found = True  # something is in sys.modules under that name
    return "xformers is installed" if found else "xformers is not installed"


_WARNED = set()


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"mae_fast attention: {reason}; using torch SDPA instead (this warning is shown "
                  f"once per reason; set {ENV}=sdpa to silence it)", AttentionBackendWarning, stacklevel=3)


def _choose(device: torch.device, backend: str) -> Choice:
    """The chooser registered with mae_fast.backends (cached there per device type / env)."""
    backend = check_attn_backend(backend)
    if backend == "auto":
        env = _env_backend()
        if env is not None:
            backend, who = env, f"{ENV}={env}"
        else:
            who = None
    else:
        who = f"backend={backend!r} asked for"
    if backend == "math":
        return Choice("attention", "math", f"{who}: softmax(q k^T * scale) v, the reference")
    if backend == "sdpa":
        return Choice("attention", "sdpa", f"{who}: torch scaled_dot_product_attention")
    if backend == "xformers":
        xops, why, _ = _load_xformers()
        if xops is None:
            raise RuntimeError(f"attention {who}, but {why}")
        return Choice("attention", "xformers", f"{who}: {why}; xformers' dispatcher checks each "
                                               "input signature (error if it rejects one)")
    # auto
    if device.type != "cuda":
        return Choice("attention", "sdpa", f"{device.type} tensors: xformers runs on CUDA only "
                                           f"({_xformers_installed_hint()}); torch SDPA")
    hip = getattr(torch.version, "hip", None)
    if hip:  # no import of xformers, no warning: mae_fast.backends warns once about ROCm
        return Choice("attention", "sdpa", f"ROCm build of torch (torch.version.hip = {hip}): "
                                           "auto keeps to torch's own SDPA, not xformers")
    xops, why, installed = _load_xformers()
    if xops is None:
        if installed:  # a broken install is worth a warning; a missing optional extra is not
            _warn_once(why)
        return Choice("attention", "sdpa", f"{why}; torch SDPA")
    return Choice("attention", "xformers", f"{why} and tensors are on CUDA; inputs xformers' "
                                           "dispatcher rejects (dtype, head dim, GPU) run SDPA")


register_chooser("attention", _choose)


# ---------------------------------------------------------------------------------------------
# does xformers accept these inputs? (its own dispatcher decides; cached per signature)

# (device, dtype, H, K, needs_grad, deterministic) -> None (accepted) or the reason it is not
_XF_ACCEPTS: Dict[tuple, Optional[str]] = {}


def _xformers_rejection(xops, q, k, v, scale: float, needs_grad: bool) -> Optional[str]:
    """None if xformers' dispatcher has an operator for q, k, v (B, M, H, K), else why not."""
    key = (q.device, q.dtype, q.shape[2], q.shape[3], needs_grad,
           torch.are_deterministic_algorithms_enabled())
    if key in _XF_ACCEPTS:
        return _XF_ACCEPTS[key]
    fmha = xops.fmha
    inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=None, p=0.0, scale=scale)
    try:
        fmha.dispatch._dispatch_fw(inp, needs_grad)
        if needs_grad:
            fmha.dispatch._dispatch_bw(inp, None)
        reason = None
    except NotImplementedError as e:
        # the message lists every operator and why it declines; drop the shape lines (they carry
        # the batch and sequence length) so one kind of input gives one reason
        said = "\n".join(line for line in str(e).splitlines() if "shape=" not in line)
        reason = (f"xformers has no operator for dtype={q.dtype}, head_dim={q.shape[3]}, "
                  f"device={q.device}{' with gradients' if needs_grad else ''}. xformers says:\n{said}")
    except AttributeError as e:  # an xformers without this (private) dispatcher: let it try
        reason = None
        warnings.warn(f"mae_fast attention: cannot ask xformers' dispatcher ({e}); calling it directly",
                      AttentionBackendWarning, stacklevel=3)
    _XF_ACCEPTS[key] = reason
    return reason


def _clear_caches() -> None:
    """Forget what was learnt about xformers (for tests, or after installing it mid-session)."""
    import mae_fast.backends as backends
    _load_xformers.cache_clear()
    _XF_ACCEPTS.clear()
    _WARNED.clear()
    backends.clear_cache()


# ---------------------------------------------------------------------------------------------
# the three layouts


def _split_bmhk(qkv, num_heads: int):
    """qkv (B, M, 3*C) -> q, k, v (B, M, H, K): strided views of qkv, no copy."""
    B, M, C3 = qkv.shape
    return qkv.reshape(B, M, 3, num_heads, C3 // (3 * num_heads)).unbind(2)


def _split_bhmk(qkv, num_heads: int):
    """qkv (B, M, 3*C) -> q, k, v (B, H, M, K): strided views of qkv, no copy."""
    B, M, C3 = qkv.shape
    return qkv.reshape(B, M, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _xformers_attention(xops, q, k, v, scale: float):
    """q, k, v (B, M, H, K) -> (B, M, H*K)."""
    B, M, H, K = q.shape
    out = xops.memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=scale)  # (B, M, H, K)
    return out.reshape(B, M, H * K)


def _sdpa_attention(q, k, v, scale: float):
    """q, k, v (B, H, M, K) -> (B, M, H*K)."""
    B, H, M, K = q.shape
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=scale)  # (B, H, M, K)
    return out.transpose(1, 2).reshape(B, M, H * K)


def _math_attention(q, k, v, scale: float):
    """q, k, v (B, H, M, K) -> (B, M, H*K), attn (B, H, M, M)."""
    B, H, M, K = q.shape
    out, attn = reference.attention(q, k, v, scale)  # (B, H, M, K), (B, H, M, M)
    return out.transpose(1, 2).reshape(B, M, H * K), attn


def _check(qkv, num_heads) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads) != 0 or qkv.shape[-1] == 0:
        raise ValueError(f"qkv must be (B, M, 3*num_heads*head_dim) with num_heads={num_heads}, "
                         f"got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be floating point, got {qkv.dtype}")


def _resolve(qkv, num_heads: int, scale: float, backend: str, needs_grad: Optional[bool] = None):
    """Which implementation runs attention on this qkv -> (impl, xops or None); xformers falls
    back to sdpa (auto, with a warning) or raises (asked for) when its dispatcher rejects the
    inputs (for the forward, and the backward when ``needs_grad``: by default whether qkv
    requires grad)."""
    impl = choose("attention", qkv.device, backend).impl
    if impl != "xformers":
        return impl, None
    xops = _load_xformers()[0]
    q, k, v = _split_bmhk(qkv, num_heads)  # (B, M, H, K) views
    if needs_grad is None:
        needs_grad = qkv.requires_grad and torch.is_grad_enabled()
    rejected = _xformers_rejection(xops, q, k, v, scale, needs_grad)
    if rejected is None:
        return "xformers", xops
    if check_attn_backend(backend) != "auto" or _env_backend() is not None:
        raise RuntimeError(f"attention backend 'xformers' asked for, but {rejected}")
    _warn_once(rejected)
    return "sdpa", None


def _split(impl: str, qkv, num_heads: int):
    """q, k, v views of qkv in the layout ``impl`` takes: BMHK for xformers, BHMK otherwise."""
    return _split_bmhk(qkv, num_heads) if impl == "xformers" else _split_bhmk(qkv, num_heads)


def _run(impl: str, xops, q, k, v, scale: float):
    """Attention of q, k, v (in ``_split``'s layout for impl) -> (B, M, C)."""
    if impl == "xformers":
        return _xformers_attention(xops, q, k, v, scale)
    if impl == "math":
        return _math_attention(q, k, v, scale)[0]
    return _sdpa_attention(q, k, v, scale)


def attend(qkv, num_heads: int, scale: float, *, backend: str = "auto", return_attn: bool = False):
    """Multi-head self-attention of the qkv projection.

    qkv (B, M, 3*C) -> out (B, M, C); with ``return_attn=True`` -> (out, attn (B, H, M, M)),
    computed by the math path whatever ``backend`` says (only it forms the weights).
    """
    _check(qkv, num_heads)
    if return_attn:
        return _math_attention(*_split_bhmk(qkv, num_heads), scale)
    impl, xops = _resolve(qkv, num_heads, scale, backend)
    return _run(impl, xops, *_split(impl, qkv, num_heads), scale)


# ---------------------------------------------------------------------------------------------
# qkv projection + attention without the d(qkv) merge in backward


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type`` tensors, or None."""
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_linear_casts(device_type: str, *tensors):
    """The casts autocast makes for aten ``linear`` (a lower-precision op), made by hand where a
    custom op replaces it (recorded by autograd, as autocast's are): under autocast every tensor
    but None and float64 goes to the autocast dtype; unchanged outside autocast."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors)


def _head_rows(g, impl: str):
    """A gradient of q / k / v in ``_split``'s layout -> (B*M, C): a view when its memory is
    (B, M, H, K) (flash and xformers write it so), a copy otherwise (e.g. CPU math)."""
    if impl == "xformers":
        B, M, H, K = g.shape
        return g.reshape(B * M, H * K)
    B, H, M, K = g.shape
    return g.transpose(1, 2).reshape(B * M, H * K)


# dtypes of the Triton weight-gradient GEMM (mae_fast::linear_weight_grad)
WGRAD_GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _QKVAttention(torch.autograd.Function):
    """out = attention(split(x @ W^T + b)), x (B, M, C), W (3C, C), b (3C,) -> (B, M, C).

    Backward: dq, dk, dv come from the attention's own backward (``torch.autograd.grad`` on the
    graph built in forward on detached q, k, v views), each in the memory the attention kernel
    wrote, and the projection's gradients are taken from them directly, never merged into one
    d(qkv) (autograd's plain path stacks them and copies the stack back to (B, M, 3C)):
      dW (3C, C) and db (3C,): with ``MAE_FAST_MLP=gemm`` (the "mlp" choice of ``gemm_backend``
        is triton) and fp32 / fp16 / bf16, ONE launch of the Triton weight-gradient GEMM
        ``mae_fast::linear_weight_grad`` with G = [dq | dk | dv] given as three column parts
        (read in place, strides their own), the bias sums taken from the G tiles it loads;
        otherwise (the default) three cuBLAS GEMMs dq^T x, dk^T x, dv^T x into row slices of
        one buffer and three column sums into slices of one buffer;
      dx (B, M, C): dq Wq + dk Wk + dv Wv, one GEMM then two accumulating ones.
    Saved for backward: x and W (what the linear's backward saves) and the attention's own
    graph (q, k, v views of the qkv buffer, out, log-sum-exp: what the plain path saves)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads: int, scale: float, backend: str, wgrad_gemm: bool):
        qkv = F.linear(x, weight, bias)  # (B, M, 3C)
        impl, xops = _resolve(qkv, num_heads, scale, backend, needs_grad=True)
        q, k, v = (t.detach().requires_grad_() for t in _split(impl, qkv, num_heads))
        with torch.enable_grad():
            out = _run(impl, xops, q, k, v, scale)  # (B, M, C)
        ctx.graph = (out, q, k, v)
        ctx.impl = impl
        ctx.has_bias = bias is not None
        ctx.wgrad_gemm = wgrad_gemm
        ctx.save_for_backward(x, weight)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        if ctx.graph is None:
            raise RuntimeError("mae_fast qkv_attention: a second backward through the same graph "
                               "(retain_graph=True) is not supported by the fused path; use "
                               "model.set_fused_blocks(False) (or Attention.fused_qkv = False)")
        out, q, k, v = ctx.graph
        ctx.graph = None  # the attention's graph (and the qkv buffer) is freed after this backward
        x, weight = ctx.saved_tensors
        B, M, C = x.shape
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        rows = [_head_rows(g, ctx.impl) for g in (dq, dk, dv)]  # 3 x (B*M, C)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = torch.mm(rows[0], weight[:C])  # (B*M, C)
            dx.addmm_(rows[1], weight[C:2 * C])
            dx.addmm_(rows[2], weight[2 * C:])
            dx = dx.view(B, M, C)
        need_b = need_b and ctx.has_bias
        if ctx.wgrad_gemm and (need_w or need_b):  # one Triton launch: dW (3C, C) and db (3C,)
            dw, db = torch.ops.mae_fast.linear_weight_grad(rows[0], x.reshape(B * M, C), rows[1], rows[2])
            return dx, dw if need_w else None, db if need_b else None, None, None, None, None
        if need_w:
            x2d = x.reshape(B * M, C)
            dw = weight.new_empty(weight.shape)  # (3C, C)
            for i, g in enumerate(rows):
                torch.mm(g.t(), x2d, out=dw[i * C:(i + 1) * C])
        if need_b:
            db = weight.new_empty(3 * C)
            for i, g in enumerate(rows):
                torch.sum(g, 0, out=db[i * C:(i + 1) * C])
        return dx, dw, db, None, None, None, None


def qkv_attention(x, qkv, num_heads: int, scale: float, *, backend: str = "auto", fused: bool = True,
                  gemm_backend: str = "auto"):
    """The qkv projection ``qkv`` (an ``nn.Linear(C, 3C)``) of x (B, M, C) and attention -> (B, M, C).

    ``fused=True`` (default) runs ``_QKVAttention``, whose backward never forms d(qkv), when it
    can: a plain ``nn.Linear`` without hooks, a fused backend (sdpa / xformers), gradients
    wanted, not under torch.compile (which traces the plain path and derives its own
    backward). Otherwise the plain path: ``attend(qkv(x), ...)``. Both compute the same math.
    ``gemm_backend`` (a ``mae_fast.backends`` name, the model's ``backend``): where its "mlp"
    choice is triton (``MAE_FAST_MLP=gemm``) the fused backward's dW and db are one Triton
    weight-gradient launch (fp32 / fp16 / bf16; other dtypes run the cuBLAS code).
    """
    if not (fused and type(qkv) is torch.nn.Linear and not (qkv._forward_hooks or qkv._forward_pre_hooks)
            and torch.is_grad_enabled() and (x.requires_grad or qkv.weight.requires_grad)
            and isinstance(x, torch.Tensor) and x.dim() == 3 and not torch.compiler.is_compiling()):
        return attend(qkv(x), num_heads, scale, backend=backend)
    weight, bias = qkv.weight, qkv.bias
    B, M, C = x.shape
    if weight.shape != (3 * C, C) or C % num_heads:
        raise ValueError(f"qkv must map C={C} channels to 3C with C divisible by num_heads={num_heads}, "
                         f"got weight {tuple(weight.shape)}")
    if choose("attention", x.device, backend).impl == "math":  # the oracle: the plain path
        return attend(qkv(x), num_heads, scale, backend=backend)
    x, weight, bias = _autocast_linear_casts(x.device.type, x, weight, bias)
    wgrad_gemm = (choose("mlp", x.device, gemm_backend).impl == "triton"
                  and x.dtype == weight.dtype and x.dtype in WGRAD_GEMM_DTYPES)
    with _autocast_off(x.device.type):
        return _QKVAttention.apply(x, weight, bias, num_heads, scale, backend, wgrad_gemm)


def _autocast_off(device_type: str):
    import contextlib
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# attention maps for visualisation


@torch.no_grad()
def attention_maps(model, imgs, **forward_kwargs) -> Dict[str, torch.Tensor]:
    """Run ``model(imgs, **forward_kwargs)`` and return every block's attention weights.

    -> {module name: attn (N, H, M, M)}, e.g. ``"blocks.0.attn"`` (encoder: M = 1 + len_keep,
    token 0 is cls, token 1+j is patch ``argsort(noise)[:, j]``) and ``"decoder_blocks.0.attn"``
    (M = 1 + L in image order). Each row sums to 1. The forward pass runs with the model's own
    backend; the weights are recomputed by the math path from each block's input, so the maps
    are exact whatever backend runs the model. Pass ``noise=`` to know which patches were kept.
    """
    from .layers import Attention

    maps: Dict[str, torch.Tensor] = {}
    hooks = []

    def record(name):
        def hook(module, args, output):
            qkv = module.qkv(args[0])  # (N, M, 3*C)
            maps[name] = attend(qkv, module.num_heads, module.scale, return_attn=True)[1]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, Attention):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        model(imgs, **forward_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return maps
