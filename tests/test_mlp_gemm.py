"""The opt-in MLP GEMMs (``MAE_FAST_MLP=gemm``, mae_fast.ops.mlp / kernels/mlp_gemm.py) against
the plain nn.Linear + nn.GELU() + nn.Linear, forward and every gradient, run by the Triton
interpreter on CPU (tests that take ``device`` also run compiled on CUDA tensors in the CUDA
lane, tests/_lane.py). Shapes are tiny and odd (rows not a multiple of any tile, widths down to
3): the interpreter is slow, and the tiles shrink to narrow widths as they would on a GPU."""
import copy
import os

import pytest
import torch
import torch.nn as nn

from mae_fast import accounting, backends
from mae_fast.layers import Mlp
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops import mlp as mlp_ops
from _lane import lane_device

pytestmark = pytest.mark.skipif(not mlp_ops._triton_runs(lane_device()),
                                reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("y", "x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# (leading shape of x, in, hidden, out): rows 2*3 = 6 and 131 (one more than a 128-row tile),
# widths 5 / 3 / 4 (below the 16-wide minimum tile), 24 / 40 / 20 (not powers of two)
SHAPES = [((2, 3), 5, 3, 4), ((131,), 24, 40, 20)]


@pytest.fixture
def gemm_mode(monkeypatch):
    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    yield
    backends.clear_cache()


def _mlp(C, H, C_out, dtype, backend="fast"):
    torch.manual_seed(0)
    mlp = Mlp(C, H, C_out).to(dtype)
    mlp.backend = backend
    return mlp


def _run(mlp, x, grad_y, autocast_dtype=None):
    """[y, dx, dW1, db1, dW2, db2] of one forward + backward."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        y = mlp(x)
    y.backward(grad_y.to(y.dtype))
    return [y.detach(), x.grad, mlp.fc1.weight.grad, mlp.fc1.bias.grad, mlp.fc2.weight.grad,
            mlp.fc2.bias.grad]


def _pair_results(mlp, x, grad_y, monkeypatch, autocast_dtype=None):
    """(fused, plain) results of the same module: MAE_FAST_MLP=gemm, then plain."""
    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    got = _run(mlp, x, grad_y, autocast_dtype)
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    want = _run(mlp, x, grad_y, autocast_dtype)
    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    return got, want


def _assert_within_twice_reference_error(got, want, exact, dtype, label=""):
    """flash-attention's rule: max |fast - exact| <= 2 max |reference - exact| + one ulp of the
    dtype (the interpreter truncates fp32 -> bf16 where a GPU rounds: docs/TRITON.md)."""
    for name, g, w, e in zip(NAMES, got, want, exact):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        err_fast = (g.double() - e).abs().max().item()
        err_torch = (w.double() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"{label}{name}: {err_fast} > 2 * {err_torch} + {floor}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, C, H, C_out", SHAPES)
def test_forward_and_backward_match_plain_mlp(lead, C, H, C_out, dtype, monkeypatch, device):
    """fp32: equal to the plain module within fp32 summation-order noise; fp16/bf16: within twice
    the plain module's own error against float64 (the same module run in double)."""
    mlp = _mlp(C, H, C_out, dtype)
    x, grad_y = torch.randn(*lead, C).to(dtype), torch.randn(*lead, C_out).to(dtype)
    got, want = _pair_results(mlp, x, grad_y, monkeypatch)
    if dtype == torch.float32:
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, atol=2e-6 * max(1.0, w.abs().max().item()), rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        return
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    exact = _run(copy.deepcopy(mlp).double(), x.double(), grad_y.double())
    _assert_within_twice_reference_error(got, want, exact, dtype)


def test_fused_path_really_runs_the_kernels(gemm_mode, device):
    """The dispatch: with MAE_FAST_MLP=gemm a fast-backend Mlp runs the four ops, no aten gelu."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    mlp = _mlp(8, 16, 8, torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    with Ops() as seen:
        mlp(x).sum().backward()
    names = [n for n in seen.names if n.startswith("mae_fast::")]
    assert names == ["mae_fast::mlp_fc1_gelu", "mae_fast::mlp_fc2", "mae_fast::mlp_fc2_gelu_grad",
                     "mae_fast::linear_weight_grad", "mae_fast::linear_weight_grad"], names
    assert not any("gelu" in n for n in seen.names if n.startswith("aten::"))


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_cpu_autocast_matches_linear_policy(dtype, monkeypatch, device):
    """Under autocast the fused path casts as aten linear does: bf16 output, fp32 gradients on the
    fp32 parameters, within twice the plain module's own error against float64."""
    mlp = _mlp(24, 40, 20, torch.float32)
    x, grad_y = torch.randn(2, 7, 24), torch.randn(2, 7, 20)
    got, want = _pair_results(mlp, x, grad_y, monkeypatch, autocast_dtype=dtype)
    assert got[0].dtype == want[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in got[1:])
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    exact = _run(copy.deepcopy(mlp).double(), x.double(), grad_y.double())
    _assert_within_twice_reference_error(got, want, exact, dtype)


def test_ops_against_float64(device):
    """Each kernel against float64 on odd shapes: fc1 + bias + GELU (pre and act), d(pre) =
    (dy @ W2) * GELU'(pre), and the weight gradient with its bias sums (more rows than one step,
    widths not multiples of the tiles), fp32 IEEE products."""
    M, C, H = 37, 20, 70
    x, w1, b1 = torch.randn(M, C), torch.randn(H, C) * 0.2, torch.randn(H)
    pre, act = mlp_ops.mlp_fc1_gelu(x, w1, b1)
    want_pre = x.double() @ w1.double().t() + b1.double()
    torch.testing.assert_close(pre.double(), want_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act.double(), nn.functional.gelu(want_pre), atol=1e-5, rtol=1e-5)
    grad_y, w2 = torch.randn(M, C), torch.randn(C, H) * 0.2
    got = mlp_ops.mlp_fc2_gelu_grad(grad_y, w2, pre)
    want = torch.ops.aten.gelu_backward(grad_y.double() @ w2.double(), pre.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    grad_w, grad_b = mlp_ops.linear_weight_grad(got, x)
    torch.testing.assert_close(grad_w.double(), got.double().t() @ x.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_b.double(), got.double().sum(0), atol=1e-5, rtol=1e-5)


def test_weight_grad_is_deterministic_and_reads_strided_inputs(device):
    """One program per output tile, rows in order: two runs bit-equal; strided G and X views."""
    base_g, base_x = torch.randn(45, 2 * 33), torch.randn(45, 19 + 3)
    g, x = base_g[:, ::2], base_x[:, 3:]
    first, second = mlp_ops.linear_weight_grad(g, x), mlp_ops.linear_weight_grad(g, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.testing.assert_close(first[0].double(), g.double().t() @ x.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(first[1].double(), g.double().sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_of_three_column_parts(dtype, device):
    """G = [G0 | G1 | G2] given as three (M, N) parts (the qkv projection's dq, dk, dv), each
    with its own row stride (a column slice of a wider buffer, a contiguous tensor, a row-strided
    view) -> dW (3N, K) and db (3N,) from one launch, against float64 on the concatenated G: one
    rounding to the dtype at most (fp32: summation order)."""
    M, N, K = 37, 10, 13  # rows over two BLOCK_M steps, widths below one tile
    wide, tall = torch.randn(M, 3 * N).to(dtype), torch.randn(2 * M, N).to(dtype)
    parts = (wide[:, N:2 * N], torch.randn(M, N).to(dtype), tall[::2])
    x = torch.randn(M, K).to(dtype)
    grad_w, grad_b = mlp_ops.linear_weight_grad(parts[0], x, parts[1], parts[2])
    g = torch.cat(parts, 1).double()
    want_w, want_b = g.t() @ x.double(), g.sum(0)
    assert grad_w.shape == (3 * N, K) and grad_b.shape == (3 * N,) and grad_w.dtype == grad_b.dtype == dtype
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(grad_w.double(), want_w, atol=eps * want_w.abs().max().item(), rtol=eps)
    torch.testing.assert_close(grad_b.double(), want_b, atol=eps * want_b.abs().max().item(), rtol=eps)
    again = mlp_ops.linear_weight_grad(parts[0], x, parts[1], parts[2])  # deterministic
    assert torch.equal(again[0], grad_w) and torch.equal(again[1], grad_b)


def test_weight_grad_bad_parts_are_clear_errors():
    g, x = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match="without grad_out_1"):
        mlp_ops.linear_weight_grad(g, x, None, g)
    with pytest.raises(ValueError, match="one shape and dtype"):
        mlp_ops.linear_weight_grad(g, x, torch.randn(5, 5))
    with pytest.raises(ValueError, match="one shape and dtype"):
        mlp_ops.linear_weight_grad(g, x, g.double())


def test_torch_fallback_of_the_op_bodies(monkeypatch, device):
    """Off-Triton devices run torch code in the op bodies: it agrees with the kernels."""
    x, w1, b1 = torch.randn(9, 12), torch.randn(20, 12) * 0.3, torch.randn(20)
    grad_y, w2 = torch.randn(9, 12), torch.randn(12, 20) * 0.3
    runs = lambda: (*mlp_ops.mlp_fc1_gelu(x, w1, b1),  # noqa: E731
                    mlp_ops.mlp_fc2_gelu_grad(grad_y, w2, x @ w1.t()),
                    *mlp_ops.linear_weight_grad(grad_y, x),
                    *mlp_ops.linear_weight_grad(grad_y, x, 2 * grad_y, grad_y.flip(0)))
    triton_out = runs()
    monkeypatch.setattr(mlp_ops, "_triton_runs", lambda device: False)
    for a, b in zip(triton_out, runs()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck(device):
    x = torch.randn(5, 6, requires_grad=True)
    w1, b1 = torch.randn(7, 6, requires_grad=True), torch.randn(7, requires_grad=True)
    w2, b2 = torch.randn(3, 7, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(mlp_ops.mlp_fc1_gelu, (x, w1, b1))
    torch.library.opcheck(mlp_ops.mlp_fc1_gelu, (x, w1, None))
    pre, act = (t.detach().requires_grad_() for t in mlp_ops.mlp_fc1_gelu(x, w1, b1))
    torch.library.opcheck(mlp_ops.mlp_fc2, (act, pre, w2, b2))
    torch.library.opcheck(mlp_ops.mlp_fc2_gelu_grad, (torch.randn(5, 3), w2.detach(), pre.detach()))
    torch.library.opcheck(mlp_ops.linear_weight_grad, (torch.randn(5, 3), x.detach()))
    torch.library.opcheck(mlp_ops.linear_weight_grad, (torch.randn(5, 3), x.detach(), torch.randn(5, 3),
                                                      torch.randn(5, 3)))


def test_meta_shapes():
    x = torch.empty(6, 8, device="meta", dtype=torch.bfloat16)
    w1, w2 = torch.empty(16, 8, device="meta", dtype=torch.bfloat16), torch.empty(4, 16, device="meta",
                                                                                    dtype=torch.bfloat16)
    pre, act = torch.ops.mae_fast.mlp_fc1_gelu(x, w1, None)
    assert pre.shape == act.shape == (6, 16) and pre.dtype == torch.bfloat16
    assert torch.ops.mae_fast.mlp_fc2(act, pre, w2, None).shape == (6, 4)
    assert torch.ops.mae_fast.mlp_fc2_gelu_grad(torch.empty(6, 4, device="meta", dtype=torch.bfloat16),
                                                w2, pre).shape == (6, 16)
    gw, gb = torch.ops.mae_fast.linear_weight_grad(pre, x)
    assert gw.shape == (16, 8) and gb.shape == (16,)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flops:
        gw, gb = torch.ops.mae_fast.linear_weight_grad(pre, x, pre, pre)
    assert gw.shape == (48, 8) and gb.shape == (48,)
    assert flops.get_total_flops() == 2 * 6 * 48 * 8  # dW (3 * 16, 8) over 6 rows


def test_torch_compile_fullgraph(gemm_mode, device):
    """The four ops trace into one graph (fake impls), forward and the autograd backward."""
    mlp = _mlp(8, 12, 8, torch.float32)
    x, grad_y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want = _run(mlp, x, grad_y)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    got = _run(compiled, x, grad_y)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


def test_switch_structure_and_dtype_rules(gemm_mode, monkeypatch):
    """Only the plain structure runs fused (exact GELU, no active dropout, plain Linears, no
    hooks); float64 runs plain under "auto" and is a TypeError under "fast"; "reference" and the
    default mode never run it; a bad MAE_FAST_MLP is an error."""
    x = torch.randn(3, 8)
    assert mlp_ops.fused_mlp_runs(_mlp(8, 16, 8, torch.float32), x, "fast")
    tanh = _mlp(8, 16, 8, torch.float32)
    tanh.act = nn.GELU(approximate="tanh")
    drop = Mlp(8, 16, 8, drop=0.1)
    hooked = _mlp(8, 16, 8, torch.float32)
    hooked.fc1.register_forward_hook(lambda *a: None)
    for mlp in (tanh, drop, hooked):
        assert not mlp_ops.fused_mlp_runs(mlp, x, "fast")
    drop.eval()
    assert mlp_ops.fused_mlp_runs(drop, x, "fast")
    double = _mlp(8, 16, 8, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        mlp_ops.fused_mlp_runs(double, x.double(), "fast")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not mlp_ops.fused_mlp_runs(double, x.double(), "reference")
    assert backends.choose("mlp", "cpu", "auto").impl == "reference"  # never the interpreter
    assert backends.choose("mlp", "cuda", "reference").impl == "reference"
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    assert backends.choose("mlp", "cuda", "fast").impl == "reference"
    monkeypatch.setenv("MAE_FAST_MLP", "cutlass")
    with pytest.raises(ValueError, match="MAE_FAST_MLP"):
        backends.choose("mlp", "cuda", "auto")


def test_info_reports_the_mlp_path(monkeypatch):
    from mae_fast import info
    monkeypatch.delenv("MAE_FAST_MLP", raising=False)
    assert "MAE_FAST_MLP unset or 'plain'" in info.report()
    assert "block implementation: pending" in info.report()
    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    text = info.report()
    cuda = text[text.index("on cuda tensors"):]
    line = next(ln for ln in cuda.splitlines() if ln.strip().startswith("mlp"))
    assert "MAE_FAST_MLP=gemm" in line
    assert "MLP GEMM path (opt-in, MAE_FAST_MLP=gemm; GPU speed not measured): gemm" in text
    assert "block implementation: stream" in text and "mae_fast::linear_residual" in text
    backends.clear_cache()


# ---- the whole model ---------------------------------------------------------------------------

TINY = dict(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=True)


def _model_pair():
    torch.manual_seed(0)
    ref = MaskedAutoencoderViT(**TINY, backend="reference")
    with torch.no_grad():
        ref.mask_token.normal_(std=0.5)
    fast = MaskedAutoencoderViT(**TINY, backend="fast")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _model_run(model, imgs, noise, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(imgs.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        loss, pred, _ = model(imgs, mask_ratio=0.5, noise=noise)
    loss.backward()
    return [loss.detach(), pred.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def test_whole_model_under_bf16_autocast_with_the_option_on(gemm_mode, device):
    """backend="fast" with MAE_FAST_MLP=gemm against backend="reference" under bf16 autocast: loss,
    pred and every gradient within twice the reference's own error against fp32 (flash rule).
    Each block's qkv projection takes its dW and db from one weight-gradient launch on dq, dk, dv."""
    from torch.utils._python_dispatch import TorchDispatchMode
    ref, fast = _model_pair()
    blocks = list(fast.blocks) + list(fast.decoder_blocks)
    assert all(mlp_ops.fused_mlp_runs(b.mlp, torch.empty(1, device=device), "fast") for b in blocks)
    imgs, noise = torch.randn(2, 3, 8, 12), torch.rand(2, 6)
    exact = _model_run(copy.deepcopy(ref), imgs, noise)
    want = _model_run(ref, imgs, noise, torch.bfloat16)

    class WeightGrads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() == "mae_fast::linear_weight_grad":
                parts.append(sum(a is not None for a in args) - 1)
            return func(*args, **(kwargs or {}))

    parts = []
    with WeightGrads():
        got = _model_run(fast, imgs, noise, torch.bfloat16)
    # fc1, fc2 and (the stream blocks) the attention proj; qkv: dq | dk | dv
    assert sorted(parts) == [1, 1, 1] * len(blocks) + [3] * len(blocks)
    assert len(got) == len(want) == len(exact)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        err_fast, err_torch = (g.float() - e).abs().max().item(), (w.float() - e).abs().max().item()
        floor = torch.finfo(torch.bfloat16).eps * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"output {i}: {err_fast} > 2 * {err_torch} + {floor}"


def test_multistep_fp32_trajectory_with_the_option_on(gemm_mode, device):
    """tests/test_multistep.py's drift check (3 AdamW steps, fast vs reference) with the MLP GEMMs."""
    import test_multistep as ms
    reference_model, fast_model = ms._models(device)
    batches = ms._batches(device)
    want, got = ms._train(reference_model, batches), ms._train(fast_model, batches)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    for (name, p_ref), p_fast in zip(reference_model.named_parameters(), fast_model.parameters()):
        if "mlp" in name:
            torch.testing.assert_close(p_fast, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # the stream blocks (residual adds in the proj / fc2 epilogues) move every other weight alike
    # too, but the k slice of the qkv bias: its gradient is 0 in exact math (softmax ignores a
    # shift along the keys), so AdamW turns rounding noise into steps (also with the plain blocks)
    for (name, p_ref), p_fast in zip(reference_model.named_parameters(), fast_model.parameters()):
        if name.endswith("qkv.bias"):
            C = p_ref.shape[0] // 3
            p_ref, p_fast = torch.cat([p_ref[:C], p_ref[2 * C:]]), torch.cat([p_fast[:C], p_fast[2 * C:]])
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_saved_activations_do_not_grow(gemm_mode, monkeypatch):
    """What autograd keeps for backward (distinct storages of the saved tensors) is no larger with
    the fused MLP than with the plain one: x, W1, pre, act, W2 either way."""
    def saved_bytes(mode):
        monkeypatch.setenv("MAE_FAST_MLP", mode)
        mlp = _mlp(8, 16, 8, torch.float32)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(5, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mlp(x)
        y.sum().backward()
        return sum(storages.values())

    assert saved_bytes("gemm") <= saved_bytes("plain")


def test_accounting_with_the_option_on(monkeypatch):
    """On meta, a tiny model's step: the same FLOPs as the plain MLP (so still HF's within 1 %),
    no aten gelu / gelu_backward, 1 launch fewer forward and 3 fewer backward per MLP, 5 fewer
    backward per qkv projection (3 mm + 3 sum -> one weight-gradient launch); the stream blocks
    (residual adds in the GEMM epilogues) 1 fewer backward per block (the proj's bias sum in its
    weight-grad kernel) and per stack (the first norm1's input gradient: the residual's and the
    LayerNorm's summed in the LayerNorm backward, no aten add)."""
    def counted(mode):
        monkeypatch.setenv("MAE_FAST_MLP", mode)
        mae = accounting.build_meta_model(lambda backend: MaskedAutoencoderViT(**TINY, backend=backend),
                                          "fast", torch.bfloat16)
        return accounting.count_step(mae, 4, 0.5)

    plain, gemm = counted("plain"), counted("gemm")
    blocks = TINY["depth"] + TINY["decoder_depth"]
    assert gemm.total().flops == plain.total().flops > 0
    ops = {r.op for r in gemm.log}
    assert "aten::gelu" not in ops and "aten::gelu_backward" not in ops
    assert set(accounting.MLP_GEMM_OPS) <= ops
    assert plain.total(phases=("fwd",)).ops - gemm.total(phases=("fwd",)).ops == blocks
    assert plain.total(phases=("bwd",)).ops - gemm.total(phases=("bwd",)).ops == (3 + 5) * blocks + blocks + 2
    assert not [r.op for r in gemm.log if r.op.split(".")[0] in ("aten::add", "aten::add_")]
    assert gemm.total().bytes < plain.total().bytes
    backends.clear_cache()


# ---- what the kernels move, and what compiles ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_charges_equal_what_the_kernels_load_and_store(dtype):
    """KERNEL_CHARGES of the four ops against the interpreter's count of their tl.load / tl.store
    (each address once per launch) and the torch ops their bodies run (mlp_fc2: one addmm)."""
    from test_accounting_kernels import assert_charge_is_real
    M, C, H = 19, 10, 24
    x, w1, b1 = torch.randn(M, C).to(dtype), torch.randn(H, C).to(dtype), torch.randn(H).to(dtype)
    assert_charge_is_real(mlp_ops.mlp_fc1_gelu, x, w1, b1, kernels=["_mlp_gemm_kernel"])
    pre, act = mlp_ops.mlp_fc1_gelu(x, w1, b1)
    w2, b2 = torch.randn(C, H).to(dtype), torch.randn(C).to(dtype)
    probe = assert_charge_is_real(mlp_ops.mlp_fc2, act, pre, w2, b2, kernels=[])
    assert [r.op for r in probe.torch_ops.log] == ["aten::addmm"]
    grad_y = torch.randn(M, C).to(dtype)
    assert_charge_is_real(mlp_ops.mlp_fc2_gelu_grad, grad_y, w2, pre, kernels=["_mlp_gemm_kernel"])
    assert_charge_is_real(mlp_ops.linear_weight_grad, pre, x, kernels=["_linear_wgrad_kernel"])
    # three column parts (the qkv projection's dq, dk, dv): still one launch, each part read once
    parts = torch.randn(3, M, 2 * H).to(dtype)[:, :, ::2].unbind(0)
    assert_charge_is_real(mlp_ops.linear_weight_grad, parts[0], x, parts[1], parts[2],
                          kernels=["_linear_wgrad_kernel"])


_COMPILE_PARTS_WITH_UNIT_ROW_STRIDES = """
import sys, torch, triton
sys.path.insert(0, sys.argv[1])
import triton_aot as tool
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from mae_fast.kernels import mlp_gemm
t = lambda *shape: torch.empty(*shape, device="meta")
for parts in ((t(40, 1), t(40, 1), t(40, 1)), (t(40, 1), t(40, 3)[:, 1:2], t(40, 1))):
    sink = []
    with tool._recording(mlp_gemm, sink):
        mlp_gemm.linear_weight_grad(parts[0], t(40, 8), *parts[1:])
    (name, grid, args, kwargs), = sink
    target = GPUTarget("cuda", 90, 32)
    options = make_backend(target).parse_options({k: kwargs[k] for k in ("num_warps", "num_stages")})
    triton.compile(tool._source(getattr(mlp_gemm, name), args, kwargs), target=target, options=options.__dict__)
"""


def test_three_part_weight_grad_compiles_with_unit_row_strides():
    """The JIT makes an int argument equal to 1 a constexpr: parts of width 1 have row stride 1,
    alone or beside a part whose row stride is 3. The kernel picks the part's G with a select,
    which compiles either way (an if / else could not merge a constexpr with an int: it failed
    to compile). The interpreter does not specialise, so only a compile shows it (sm_90, no GPU)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE_PARTS_WITH_UNIT_ROW_STRIDES, os.path.join(root, "tools")],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_every_mlp_width_and_dtype_is_in_the_aot_launches():
    """tools/triton_aot.py compiles the MLP kernels for every dtype; the ViT-B/L/H and decoder
    widths specialise alike (multiples of 16), so one compiled variant per (kernel, dtype,
    epilogue) covers them all (tests/test_triton_aot.py checks 0 spills in every row)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("triton_aot", os.path.join(root, "tools", "triton_aot.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from mae_fast.kernels import mlp_gemm
    keys = {}
    for label, module, call in tool.mlp_calls():
        sink = []
        with tool._recording(module, sink):
            call()
        for name, grid, args, kwargs in sink:
            keys.setdefault(label, set()).add(
                (name, repr([tool._specialisation(a) for a in args]), repr(sorted(kwargs.items()))))
    assert all(len(v) == 1 for v in keys.values()), keys  # every width: the same variant
    # 3 dtypes x (fc1 + GELU, dgrad * GELU', wgrad + bias, qkv's 3-part wgrad, residual) + 2
    # residuals on an fp32 stream (bf16 / fp16 autocast)
    assert len(keys) == 3 * 5 + 2
    labels = [label for label, *_ in tool.launches()]
    assert set(keys) <= set(labels)
    assert {name for _, _, name, *_ in tool.launches() if name.startswith("_mlp") or name.startswith("_linear")} \
        == {n for n in dir(mlp_gemm) if n.startswith("_") and n.endswith("_kernel")}


# ---- the residual epilogue (the blocks' ``s = s + proj(o)`` / ``s = s + fc2(act)``) ------------

def _residual_pair(fn, leaves, grad_out):
    """[out, grad of every leaf] of ``fn(*leaves)`` and the leaves' grads (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype, stream", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16+fp32-stream"])
def test_linear_residual_matches_the_plain_linear_and_add(dtype, stream, device):
    """out = residual + F.linear(a, W, b) on odd shapes (37 rows, 20 -> 24), forward and every
    gradient: fp32 equal to the plain ops within summation-order noise, bf16 / fp16 within
    twice the plain ops' error against float64; the output dtype is the plain add's promotion."""
    M, K, N = 37, 20, 24
    a, w, b = torch.randn(M, K).to(dtype), (torch.randn(N, K) * 0.2).to(dtype), torch.randn(N).to(dtype)
    res, grad_out = torch.randn(M, N).to(stream), torch.randn(M, N)
    got = _residual_pair(mlp_ops.linear_residual, (a, w, b, res), grad_out)
    plain = lambda a, w, b, r: r + nn.functional.linear(a, w, b)  # noqa: E731
    want = _residual_pair(plain, (a, w, b, res), grad_out)
    exact = _residual_pair(plain, [t.double() for t in (a, w, b, res)], grad_out.double())
    assert [g.dtype for g in got] == [w_.dtype for w_ in want]
    assert got[0].dtype == torch.promote_types(dtype, stream)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:
        names = ("out", "a", "W", "b", "residual")
        for name, g, w_, e in zip(names, got, want, exact):
            err_fast, err_torch = (g.double() - e).abs().max().item(), (w_.double() - e).abs().max().item()
            floor = torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
            assert err_fast <= 2 * err_torch + floor, f"{name}: {err_fast} > 2 * {err_torch} + {floor}"


def test_linear_residual_passes_the_stream_gradient_through_without_a_copy(device):
    """d residual is the incoming gradient itself (no copy, no kernel)."""
    a, w, b = torch.randn(5, 6, requires_grad=True), torch.randn(7, 6), torch.randn(7)
    res = torch.randn(5, 7, requires_grad=True)
    grad_out = torch.randn(5, 7)
    (grad_res,) = torch.autograd.grad(mlp_ops.linear_residual(a, w, b, res), (res,), grad_out)
    assert grad_res.data_ptr() == grad_out.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_with_residual_matches_the_plain_mlp_and_add(dtype, monkeypatch, device):
    """fused_mlp(..., residual=s) (the add in fc2's epilogue) against s + Mlp(x) with the plain
    module, forward and every gradient (x, s, fc1/fc2 weight and bias), 131 odd rows."""
    mlp = _mlp(24, 40, 20, dtype)
    x, s, grad = torch.randn(131, 24).to(dtype), torch.randn(131, 20).to(dtype), torch.randn(131, 20)
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]

    def run(module, fn, x, s, grad):
        module.zero_grad(set_to_none=True)
        x, s = x.detach().requires_grad_(), s.detach().requires_grad_()
        y = fn(module, x, s)
        y.backward(grad.to(y.dtype))
        return [y.detach(), x.grad, s.grad] + [p.grad for p in (module.fc1.weight, module.fc1.bias,
                                                               module.fc2.weight, module.fc2.bias)]

    fused = lambda m, x, s: mlp_ops.fused_mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,  # noqa: E731
                                              residual=s)
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    plain = lambda m, x, s: s + m(x)  # noqa: E731
    got, want = run(mlp, fused, x, s, grad), run(mlp, plain, x, s, grad)
    assert len(params) == 4 and [g.dtype for g in got] == [w.dtype for w in want]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        return
    exact = run(copy.deepcopy(mlp).double(), plain, x.double(), s.double(), grad.double())
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        err_fast, err_torch = (g.double() - e).abs().max().item(), (w.double() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"output {i}: {err_fast} > 2 * {err_torch} + {floor}"


def test_residual_ops_opcheck_and_meta(device):
    a, w, b = torch.randn(5, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True), torch.randn(7)
    res = torch.randn(5, 7, requires_grad=True)
    torch.library.opcheck(mlp_ops.linear_residual, (a, w, b, res))
    torch.library.opcheck(mlp_ops.linear_residual, (a.bfloat16(), w.bfloat16(), None, res))
    x, w1, b1 = torch.randn(5, 6), torch.randn(8, 6), torch.randn(8)
    pre, act = (t.detach().requires_grad_() for t in mlp_ops.mlp_fc1_gelu(x, w1, b1))
    w2 = torch.randn(7, 8, requires_grad=True)
    torch.library.opcheck(mlp_ops.mlp_fc2, (act, pre, w2, b.requires_grad_(), res))
    m = lambda *s, dt=torch.bfloat16: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    out = torch.ops.mae_fast.linear_residual(m(6, 8), m(4, 8), None, m(6, 4, dt=torch.float32))
    assert out.shape == (6, 4) and out.dtype == torch.float32
    assert torch.ops.mae_fast.mlp_fc2(m(6, 16), m(6, 16), m(4, 16), None, m(6, 4)).dtype == torch.bfloat16


def test_residual_op_bad_inputs_are_clear_errors():
    """The kernel reads its operands by the shapes it is given: a mismatch is an error before
    any launch, never an out-of-bounds read; mixed dtypes are F.linear's error, not a cast."""
    a, w, b, res = torch.randn(5, 6), torch.randn(7, 6), torch.randn(7), torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"residual \(M, N\).*residual \(5, 6\)"):
        torch.ops.mae_fast.linear_residual(a, w, b, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"weight \(7, 5\)"):
        torch.ops.mae_fast.linear_residual(a, torch.randn(7, 5), b, res)
    with pytest.raises(ValueError, match=r"bias \(6,\)"):
        torch.ops.mae_fast.linear_residual(a, w, torch.randn(6), res)
    with pytest.raises(TypeError, match="share a dtype"):
        torch.ops.mae_fast.linear_residual(a, w.bfloat16(), b, res)
    x, w1 = torch.randn(5, 6), torch.randn(8, 6)
    pre, act = mlp_ops.mlp_fc1_gelu(x, w1, None)
    with pytest.raises(ValueError, match="residual"):  # fc2's residual epilogue: the same checks
        torch.ops.mae_fast.mlp_fc2(act, pre, torch.randn(7, 8), None, torch.randn(4, 7))


def test_residual_ops_torch_compile_fullgraph(gemm_mode, device):
    """linear_add and fused_mlp with a residual trace into one graph, forward and backward."""
    mlp = _mlp(8, 12, 8, torch.float32)
    proj = nn.Linear(8, 8)

    def f(o, s, x):
        s = mlp_ops.linear_add(o, proj.weight, proj.bias, s)
        return mlp_ops.fused_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, residual=s)

    inputs = [torch.randn(2, 3, 8) for _ in range(3)]

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        mlp.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        fn(*leaves).sum().backward()
        return [t.grad for t in leaves] + [p.grad for p in list(mlp.parameters()) + list(proj.parameters())]

    torch.testing.assert_close(run(torch.compile(f, fullgraph=True, backend="aot_eager")), run(f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_charges_equal_what_the_kernels_load_and_store(dtype):
    """KERNEL_CHARGES of linear_residual and of mlp_fc2 with a residual against the
    interpreter's count of _mlp_gemm_kernel's residual epilogue (it also reads the residual)."""
    from test_accounting_kernels import assert_charge_is_real
    M, K, N = 19, 10, 24
    a, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
    for res in (torch.randn(M, N).to(dtype), torch.randn(M, N)):
        assert_charge_is_real(mlp_ops.linear_residual, a, w, b, res, kernels=["_mlp_gemm_kernel"])
        assert_charge_is_real(mlp_ops.linear_residual, a, w, None, res, kernels=["_mlp_gemm_kernel"])
        assert_charge_is_real(mlp_ops.mlp_fc2, a, a, w, b, res, kernels=["_mlp_gemm_kernel"])


def test_stream_blocks_run_the_residual_epilogues_and_match_the_plain_blocks(gemm_mode, device):
    """fp32, MAE_FAST_MLP=gemm: every block runs its stream form (the adds in the proj / fc2
    epilogues, no aten add anywhere in the step, forward or backward), and the step equals
    set_fused_blocks(False) (the plain blocks, same MLP GEMMs)."""
    _, fast = _model_pair()
    x = torch.empty(1, 2, 32)
    assert all(b.stream_runs(x) for b in list(fast.blocks) + list(fast.decoder_blocks))
    imgs, noise = torch.randn(2, 3, 8, 12), torch.rand(2, 6)
    with accounting.TrafficCounter() as seen:  # every dispatched op, forward and backward
        got = _model_run(fast, imgs, noise)
    names = [r.op for r in seen.log]
    blocks = TINY["depth"] + TINY["decoder_depth"]
    assert names.count("mae_fast::linear_residual") == blocks
    assert names.count("mae_fast::mlp_fc2") == blocks
    adds = [n for n in names if n.split(".")[0] in ("aten::add", "aten::add_")]
    assert not adds, f"a residual add ran outside a GEMM: {adds}"
    fast.set_fused_blocks(False)
    assert not any(b.stream_runs(x) for b in fast.blocks)
    want = _model_run(fast, imgs, noise)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_whole_model_compiles_fullgraph_with_the_option_on(gemm_mode, device):
    """torch.compile(fullgraph=True) of the model with MAE_FAST_MLP=gemm: under tracing the blocks
    take the pending form (the stream form's autograd function is eager-only), and the compiled
    step equals the eager one (stream blocks)."""
    _, fast = _model_pair()
    imgs, noise = torch.randn(2, 3, 8, 12), torch.rand(2, 6)
    eager = _model_run(fast, imgs, noise)
    compiled = _model_run(torch.compile(fast, fullgraph=True, backend="aot_eager"), imgs, noise)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_stream_form_only_for_the_plain_block_structure(gemm_mode):
    """A hooked attention, an active proj dropout, a proj in another dtype than the MLP, or a
    hooked / non-Triton MLP keep the pending form (the plain ops where they must run as given)."""
    from mae_fast.layers import Block
    x = torch.randn(2, 3, 8)

    def block():
        blk = Block(8, 2, mlp_ratio=2.0, qkv_bias=True)
        blk.backend = blk.mlp.backend = "fast"
        return blk

    assert block().stream_runs(x)
    hooked, drop, half, tanh = block(), block(), block(), block()
    hooked.attn.register_forward_hook(lambda *a: None)
    drop.attn.proj_drop.p = 0.1
    half.attn.proj.to(torch.bfloat16)
    tanh.mlp.act = nn.GELU(approximate="tanh")
    for blk in (hooked, drop, half, tanh):
        assert not blk.stream_runs(x)
    drop.eval()
    assert drop.stream_runs(x)
    blk = block()
    stream = blk(x)  # the single block's forward runs the stream form too
    blk.fused_norm = False
    assert not blk.stream_runs(x)
    torch.testing.assert_close(stream, blk(x), rtol=1e-5, atol=1e-5)


def test_linear_add_under_autocast_casts_as_linear_and_not_the_add(device):
    """linear_add under bf16 autocast: x, W, b cast as aten linear casts them, the fp32 stream
    not (the add is on no autocast list): out fp32, grads in the leaves' dtypes, as the plain
    ``s + F.linear(x, W, b)`` under the same autocast, within twice its error against fp64."""
    x, w, b, s = torch.randn(2, 5, 12), torch.randn(8, 12) * 0.3, torch.randn(8), torch.randn(2, 5, 8)
    grad = torch.randn(2, 5, 8)

    def run(fn, *leaves, amp=True):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast(leaves[0].device.type, dtype=torch.bfloat16, enabled=amp):
            out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    plain = lambda x, w, b, s: s + nn.functional.linear(x, w, b)  # noqa: E731
    got, want = run(mlp_ops.linear_add, x, w, b, s), run(plain, x, w, b, s)
    exact = run(plain, x.double(), w.double(), b.double(), s.double(), amp=False)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32] * 5
    for i, (g, w_, e) in enumerate(zip(got, want, exact)):
        err_fast, err_torch = (g.double() - e).abs().max().item(), (w_.double() - e).abs().max().item()
        floor = torch.finfo(torch.bfloat16).eps * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"output {i}: {err_fast} > 2 * {err_torch} + {floor}"
