"""The transformer MLP, fc1 -> exact GELU -> fc2, with its elementwise work in GEMM epilogues.
Opt-in: ``MAE_FAST_MLP=gemm`` (default ``plain``: cuBLAS ``nn.Linear`` + ``nn.GELU()`` +
``nn.Linear``). The Triton GEMMs' GPU speed is not measured (no GPU was available): a Triton
GEMM can lose to cuBLAS in ways byte counts cannot see, so this stays off until a GPU says
otherwise (docs/PERFORMANCE.md, "1d. MLP GEMM epilogues").

Five torch ops (``torch.library.custom_op`` + ``register_fake``; the three forward ops with
``register_autograd``), on x (M, C) -> hidden (M, H) -> y (M, C_out):
  ``mae_fast::mlp_fc1_gelu``      x, W1, b1 -> (pre, act): one Triton GEMM whose epilogue adds
                                  b1 and applies exact erf GELU in fp32; it stores ``pre``
                                  (GELU' needs it) and ``act`` (fc2 and dW2 need it);
  ``mae_fast::mlp_fc2``           act, pre, W2, b2 -> y = act W2^T + b2 (cuBLAS, ``F.linear``).
                                  ``act`` is GELU(pre), fc1's cached output: the backward
                                  differentiates through the GELU and returns d(pre), not d(act);
                                  with a residual s (the blocks' stream form): y = s + (act W2^T
                                  + b2), the add in the Triton GEMM's epilogue (as
                                  linear_residual), and the backward returns dy for s as is;
  ``mae_fast::mlp_fc2_gelu_grad`` dy, W2, pre -> d(pre) = (dy @ W2) * GELU'(pre): one Triton GEMM
                                  with GELU' in its epilogue (d(act) is never written);
  ``mae_fast::linear_weight_grad`` G, X -> (dW = G^T X, db = column sums of G): one Triton
                                  kernel, the bias gradient accumulated from the G tiles the
                                  weight-gradient GEMM already loads (fc2, fc1, the proj of linear_residual).
                                  G may be given as up to 3 column parts (``grad_out_1``,
                                  ``grad_out_2``), each read where it lies: the qkv projection's
                                  backward (``mae_fast.attention._QKVAttention``) passes dq, dk,
                                  dv and gets dW (3C, C) and db (3C,) from one launch (the
                                  default, MAE_FAST_MLP=plain, runs 3 mm + 3 sum there).
  ``mae_fast::linear_residual``   a, W, b, s -> s + (a W^T + b): the attention proj of the
                                  blocks' stream form, one Triton GEMM whose epilogue rounds the
                                  branch to a's dtype, adds s in fp32 and rounds once (the plain
                                  ``s + F.linear(a, W, b)``'s two roundings). Backward: ds = dout
                                  (passed through, no copy), da = dout @ W (``torch.mm``), dW and
                                  db from ``linear_weight_grad``. Saves a and W (what the plain
                                  linear saves; the plain add saves nothing).
dx = d(pre) @ W1 stays ``torch.mm``.

Saved for backward (vs autograd's plain path): x, W1, pre, act, W2, exactly what the plain
path saves (addmm: x and W1; gelu: pre; addmm: act and W2), so activation memory does not
grow; the backward makes one (M, H) temporary, d(pre), where the plain path makes two (d(act),
then d(pre)). Launches per MLP: forward 2 (plain 3), backward 4 (plain 7: d(act) mm,
gelu_backward, two weight-gradient mms, two bias sums, the dx mm).

Numerics: fp32 accumulation; bias + GELU / GELU' in fp32 in the epilogue, one rounding to the
output dtype; fp32 inputs use IEEE fp32 products (torch's default fp32 matmul, no TF32).
Autocast: as aten ``linear`` (lower precision): under autocast the inputs are cast to the
autocast dtype (the casts autograd records, as autocast's are), then the ops run as given.
"""
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import attention
from ..backends import Choice, check_backend, register_chooser, triton_probe
from .patch_embed import check_same_device

OP = "mlp"
ENV = "MAE_FAST_MLP"
MODES = ("plain", "gemm")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mlp_mode() -> str:
    """``MAE_FAST_MLP``: ``plain`` (default) or ``gemm`` (the Triton GEMM epilogues)."""
    mode = os.environ.get(ENV, "").strip() or "plain"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES} (or unset), got {mode!r}")
    return mode


def _choose(device: torch.device, backend: str) -> Choice:
    check_backend(backend)
    if backend == "reference":
        return Choice(OP, "reference", "backend='reference': nn.Linear + nn.GELU() + nn.Linear, "
                                       "the official ops")
    if mlp_mode() == "plain":
        return Choice(OP, "reference", f"{ENV} unset or 'plain' (the default): nn.Linear (cuBLAS "
                                       f"on CUDA) + nn.GELU() + nn.Linear; {ENV}=gemm runs the "
                                       "Triton GEMM epilogues (GPU speed not measured)")
    runs, why = triton_probe(device)
    if runs and backend == "auto" and device.type == "cpu":
        return Choice(OP, "reference", "Triton on CPU only runs in the interpreter (tests); "
                                       "backend='fast' runs it")
    if runs:
        return Choice(OP, "triton", f"{ENV}=gemm: fc1 GEMM with bias + GELU epilogue, GELU' in "
                                    f"fc2's grad-input GEMM, bias grads in the weight-grad GEMMs (the qkv "
                                    f"projection's dW + db too: one launch on dq, dk, dv); {why}")
    if backend == "fast":
        raise RuntimeError(f"backend='fast' with {ENV}=gemm: the MLP cannot run triton on {device}: {why}")
    return Choice(OP, "reference", f"triton unavailable ({why}): nn.Linear + nn.GELU() + nn.Linear")


register_chooser(OP, _choose)


def _triton_runs(device: torch.device) -> bool:
    return triton_probe(device)[0]


def _gelu_grad_torch(grad_act, pre):
    """GELU's backward in fp32 (the op bodies' torch fallback, off-Triton devices)."""
    return torch.ops.aten.gelu_backward(grad_act.float(), pre.float())


# ---- the ops ---------------------------------------------------------------------------------

@torch.library.custom_op("mae_fast::mlp_fc1_gelu", mutates_args=())
def mlp_fc1_gelu(x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K), bias (N,) or None, one dtype -> pre = x W^T + b and
    act = GELU(pre) (exact erf GELU of the fp32 pre), both (M, N) in that dtype."""
    if _triton_runs(x.device):
        from ..kernels import mlp_gemm
        return mlp_gemm.fc1_gelu(x, weight, bias)
    pre = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return pre.to(x.dtype), F.gelu(pre).to(x.dtype)


@mlp_fc1_gelu.register_fake
def _(x, weight, bias):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("mae_fast::mlp_fc2", mutates_args=())
def mlp_fc2(act: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = act W^T + b (M, C_out), ``F.linear`` (cuBLAS on CUDA), where act = GELU(pre) are
    mlp_fc1_gelu's two outputs. The backward differentiates through the GELU: it returns
    d(pre) = (dy @ W) * GELU'(pre) and no gradient for act (a cached value of GELU(pre)).
    With a residual (M, C_out): y = residual + (act W^T + b), the add in the Triton GEMM's
    epilogue (see ``linear_residual``), y in promote(act's dtype, residual's)."""
    if residual is None:
        return F.linear(act, weight, bias)
    return _linear_residual_body(act, weight, bias, residual)


@mlp_fc2.register_fake
def _(act, pre, weight, bias, residual=None):
    dtype = act.dtype if residual is None else torch.promote_types(act.dtype, residual.dtype)
    return act.new_empty((act.shape[0], weight.shape[0]), dtype=dtype)


def _linear_residual_body(a, weight, bias, residual):
    """residual + F.linear(a, weight, bias) after the checks the kernel relies on (it reads
    (M, K), (N, K), (N,) and (M, N) by those shapes: a mismatch would read out of bounds)."""
    check_same_device(a=a, weight=weight, bias=bias, residual=residual)
    if a.dim() != 2 or weight.dim() != 2 or weight.shape[1] != a.shape[1] \
            or residual.shape != (a.shape[0], weight.shape[0]) \
            or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"linear with a residual: a (M, K), weight (N, K), bias (N,), residual (M, N), got a "
                         f"{tuple(a.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, residual {tuple(residual.shape)}")
    if weight.dtype != a.dtype or (bias is not None and bias.dtype != a.dtype):
        raise TypeError(f"linear with a residual: a, weight and bias must share a dtype (as F.linear), got "
                        f"{a.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    if _triton_runs(a.device):
        from ..kernels import mlp_gemm
        return mlp_gemm.linear_residual(a, weight, bias,
                                        residual if residual.stride(-1) == 1 else residual.contiguous())
    return residual + F.linear(a, weight, bias)


@torch.library.custom_op("mae_fast::linear_residual", mutates_args=())
def linear_residual(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: torch.Tensor) -> torch.Tensor:
    """a (M, K), weight (N, K), bias (N,) or None, one dtype; residual (M, N) -> out =
    residual + (a W^T + b) (M, N) in promote(a's dtype, residual's): one Triton GEMM whose
    epilogue rounds the branch to a's dtype (``F.linear``'s result), then adds the residual in
    fp32 and rounds once (the plain ``residual + branch``)."""
    return _linear_residual_body(a, weight, bias, residual)


@linear_residual.register_fake
def _(a, weight, bias, residual):
    return a.new_empty((a.shape[0], weight.shape[0]), dtype=torch.promote_types(a.dtype, residual.dtype))


@torch.library.custom_op("mae_fast::mlp_fc2_gelu_grad", mutates_args=())
def mlp_fc2_gelu_grad(grad_y: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad_y (M, C_out), fc2's weight (C_out, N), pre (M, N) -> d(pre) = (grad_y @ W) *
    GELU'(pre), (M, N) in pre's dtype (fp32 accumulation and epilogue, one rounding)."""
    if _triton_runs(grad_y.device):
        from ..kernels import mlp_gemm
        return mlp_gemm.fc2_gelu_grad(grad_y, weight, pre if pre.stride(-1) == 1 else pre.contiguous())
    return _gelu_grad_torch(grad_y.float() @ weight.float(), pre).to(pre.dtype)


@mlp_fc2_gelu_grad.register_fake
def _(grad_y, weight, pre):
    return torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)


@torch.library.custom_op("mae_fast::linear_weight_grad", mutates_args=())
def linear_weight_grad(grad_out: torch.Tensor, inp: torch.Tensor, grad_out_1: Optional[torch.Tensor] = None,
                       grad_out_2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Linear's parameter gradients in one op: grad_out (M, N), inp (M, K), one dtype ->
    grad_weight = grad_out^T @ inp (N, K) and grad_bias = column sums of grad_out (N,), fp32
    accumulation, deterministic (one program per output tile, rows in order).

    ``grad_out_1`` / ``grad_out_2`` (M, N), optional: more column parts of the output's gradient,
    G = [grad_out | grad_out_1 | grad_out_2] (M, P * N), each read where it lies (e.g. dq, dk, dv
    of the qkv projection) -> grad_weight (P * N, K), grad_bias (P * N,), still one launch."""
    parts = [grad_out] + [g for g in (grad_out_1, grad_out_2) if g is not None]
    if grad_out_2 is not None and grad_out_1 is None:
        raise ValueError("linear_weight_grad: grad_out_2 given without grad_out_1")
    if any(g.dim() != 2 or g.shape != grad_out.shape or g.dtype != grad_out.dtype for g in parts) \
            or inp.dim() != 2 or inp.shape[0] != grad_out.shape[0] or inp.dtype != grad_out.dtype:
        raise ValueError("linear_weight_grad: the gradient's parts must be (M, N) of one shape and dtype and "
                         f"inp (M, K) of that dtype, got {[(tuple(g.shape), g.dtype) for g in parts]} and "
                         f"inp {(tuple(inp.shape), inp.dtype)}")
    if _triton_runs(grad_out.device):
        from ..kernels import mlp_gemm
        return mlp_gemm.linear_weight_grad(parts[0], inp, *parts[1:])
    x = inp.float()
    return (torch.cat([g.float().t() @ x for g in parts]).to(grad_out.dtype),
            torch.cat([g.float().sum(0) for g in parts]).to(grad_out.dtype))


@linear_weight_grad.register_fake
def _(grad_out, inp, grad_out_1=None, grad_out_2=None):
    rows = grad_out.shape[1] * (1 + (grad_out_1 is not None) + (grad_out_2 is not None))
    return grad_out.new_empty((rows, inp.shape[1])), grad_out.new_empty((rows,))


# ---- autograd --------------------------------------------------------------------------------

def _fc1_setup(ctx, inputs, output):
    x, weight, bias = inputs
    pre, _ = output
    ctx.set_materialize_grads(False)  # act's gradient is None when only mlp_fc2 reads act
    ctx.save_for_backward(x, weight, pre)
    ctx.has_bias = bias is not None


def _fc1_backward(ctx, grad_pre, grad_act):
    """grad_pre from mlp_fc2's backward (GELU' already applied); grad_act only if act was also
    used elsewhere (then through GELU' here, in torch)."""
    x, weight, pre = ctx.saved_tensors
    if grad_act is not None:
        through = torch.ops.aten.gelu_backward(grad_act, pre)
        grad_pre = through if grad_pre is None else grad_pre + through
    if grad_pre is None:
        return None, None, None
    want_x, want_w, want_b = ctx.needs_input_grad
    grad_x = torch.mm(grad_pre, weight) if want_x else None  # (M, K)
    grad_w = grad_b = None
    if want_w or (want_b and ctx.has_bias):
        grad_w, grad_b = linear_weight_grad(grad_pre, x)
    return grad_x, grad_w if want_w else None, grad_b if want_b and ctx.has_bias else None


mlp_fc1_gelu.register_autograd(_fc1_backward, setup_context=_fc1_setup)


def _fc2_setup(ctx, inputs, output):
    act, pre, weight, bias = inputs[:4]
    ctx.save_for_backward(act, pre, weight)
    ctx.has_bias = bias is not None


def _fc2_backward(ctx, grad_y):
    """With a residual, grad_y is also the residual's gradient (passed through, no copy); the
    branch's gradient is grad_y in act's dtype (autograd's cast at the plain add)."""
    act, pre, weight = ctx.saved_tensors
    _, want_pre, want_w, want_b = ctx.needs_input_grad[:4]
    want_res = len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4]
    grad_branch = grad_y.to(act.dtype)
    grad_pre = mlp_fc2_gelu_grad(grad_branch, weight, pre) if want_pre else None
    grad_w = grad_b = None
    if want_w or (want_b and ctx.has_bias):
        grad_w, grad_b = linear_weight_grad(grad_branch, act)
    return (None, grad_pre, grad_w if want_w else None, grad_b if want_b and ctx.has_bias else None,
            grad_y if want_res else None)


mlp_fc2.register_autograd(_fc2_backward, setup_context=_fc2_setup)


def _linear_residual_setup(ctx, inputs, output):
    a, weight, bias, _residual = inputs
    ctx.save_for_backward(a, weight)
    ctx.has_bias = bias is not None


def _linear_residual_backward(ctx, grad_out):
    """d residual = grad_out (passed through, no copy); the branch's gradient g = grad_out in
    a's dtype: d a = g @ W (torch.mm), (dW, db) = linear_weight_grad(g, a)."""
    a, weight = ctx.saved_tensors
    want_a, want_w, want_b, want_res = ctx.needs_input_grad
    grad_branch = grad_out.to(a.dtype)
    grad_a = torch.mm(grad_branch, weight) if want_a else None
    grad_w = grad_b = None
    if want_w or (want_b and ctx.has_bias):
        grad_w, grad_b = linear_weight_grad(grad_branch, a)
    return (grad_a, grad_w if want_w else None, grad_b if want_b and ctx.has_bias else None,
            grad_out if want_res else None)


linear_residual.register_autograd(_linear_residual_backward, setup_context=_linear_residual_setup)


# ---- the public op -----------------------------------------------------------------------------

def _is_plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


def fused_mlp_runs(mlp, x, backend: str = "auto") -> bool:
    """Whether ``mlp`` (mae_fast.layers.Mlp) runs the fused GEMMs on ``x``: the choice for
    ``backend`` is triton (MAE_FAST_MLP=gemm), the module is the plain structure the kernels
    compute (nn.Linear, exact nn.GELU(), no active dropout, no hooks), and the dtypes are ones
    the kernels take (with ``backend="fast"`` other dtypes are a TypeError)."""
    from ..backends import choose
    if not isinstance(x, torch.Tensor) or choose(OP, x.device, backend).impl != "triton":
        return False
    if not (_is_plain_linear(mlp.fc1) and _is_plain_linear(mlp.fc2) and type(mlp.act) is torch.nn.GELU
            and mlp.act.approximate == "none" and not (mlp.act._forward_hooks or mlp.act._forward_pre_hooks)
            and (mlp.drop.p == 0.0 or not mlp.training) and not (mlp._forward_hooks or mlp._forward_pre_hooks)):
        return False
    tensors = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    dtypes = {t.dtype for t in tensors if t is not None}
    if not dtypes <= set(FAST_DTYPES):
        if backend == "fast":
            raise TypeError(f"backend='fast' with {ENV}=gemm: the MLP kernels take {FAST_DTYPES}, "
                            f"got {sorted(map(str, dtypes))}")
        return False
    # without autocast mixed dtypes are nn.Linear's error: the plain path raises it
    return len(dtypes) == 1 or attention._autocast_dtype(x.device.type) is not None


def fused_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """x (..., C) -> fc2(GELU(fc1(x))) (..., C_out) through the four ops above; with a
    ``residual`` (..., C_out) -> residual + fc2(GELU(fc1(x))), the add in fc2's epilogue (the
    residual is not cast under autocast: the add is on no autocast list)."""
    C = x.shape[-1]
    if fc1_weight.shape[1] != C or fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"MLP shapes do not chain: x (..., {C}), fc1 {tuple(fc1_weight.shape)}, "
                         f"fc2 {tuple(fc2_weight.shape)}")
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = attention._autocast_linear_casts(
        x.device.type, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    with attention._autocast_off(x.device.type):
        pre, act = mlp_fc1_gelu(x.reshape(-1, C), fc1_weight, fc1_bias)  # (M, H) each
        if residual is None:
            y = mlp_fc2(act, pre, fc2_weight, fc2_bias)  # (M, C_out)
        else:
            y = mlp_fc2(act, pre, fc2_weight, fc2_bias, _rows(residual, x, fc2_weight.shape[0]))
    return y.view(*x.shape[:-1], fc2_weight.shape[0])


def _rows(residual, x, n_out: int):
    """The residual (..., n_out) of x (..., K) as (M, n_out) rows with unit column stride."""
    if residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"residual {tuple(residual.shape)} does not match the branch "
                         f"{(*x.shape[:-1], n_out)}")
    return residual.reshape(-1, n_out)


def linear_add(x, weight, bias, residual):
    """residual + F.linear(x, weight, bias), x (..., K), residual (..., N) -> (..., N) through
    ``mae_fast::linear_residual`` (the add in the Triton GEMM's epilogue); under autocast x,
    weight and bias are cast as aten ``linear`` casts them, the residual is not."""
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"x (..., {K}) does not match weight {tuple(weight.shape)}")
    x, weight, bias = attention._autocast_linear_casts(x.device.type, x, weight, bias)
    with attention._autocast_off(x.device.type):
        out = linear_residual(x.reshape(-1, K), weight, bias, _rows(residual, x, N))  # (M, N)
    return out.view(*x.shape[:-1], N)
