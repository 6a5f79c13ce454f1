"""The qkv projection + attention whose backward never forms d(qkv)
(``mae_fast.attention.qkv_attention`` / ``_QKVAttention``) against the plain path
(``attend(qkv(x))``, autograd's merge), forward and backward."""
import pytest
import torch
import torch.nn as nn

from mae_fast import accounting, attention
from mae_fast.layers import Attention, Block

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _pair(C, H, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(C, 3 * C, bias=bias).to(dtype)
    return lin


def _run(x, lin, H, fused, backend="sdpa", gemm_backend="auto"):
    x = x.detach().requires_grad_()
    lin.zero_grad(set_to_none=True)
    out = attention.qkv_attention(x, lin, H, (x.shape[-1] // H) ** -0.5, backend=backend, fused=fused,
                                  gemm_backend=gemm_backend)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    grads = [x.grad, lin.weight.grad] + ([lin.bias.grad] if lin.bias is not None else [])
    return out, grads


# odd shapes: batch 3, 7 and 11 tokens, head dims 4 and 6
@pytest.mark.parametrize("B, M, C, H", [(3, 7, 12, 3), (2, 11, 30, 5), (1, 1, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_plain(B, M, C, H, dtype, bias):
    lin = _pair(C, H, dtype, bias)
    x = torch.randn(B, M, C).to(dtype)
    out_f, grads_f = _run(x, lin, H, fused=True)
    out_p, grads_p = _run(x, lin, H, fused=False)
    torch.testing.assert_close(out_f, out_p, **TOL[dtype])
    for gf, gp in zip(grads_f, grads_p):
        assert gf.dtype == gp.dtype and gf.shape == gp.shape
        torch.testing.assert_close(gf, gp, **TOL[dtype])


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False)])
def test_weight_grad_in_one_triton_launch_with_mlp_gemm(dtype, bias, monkeypatch):
    """MAE_FAST_MLP=gemm (gemm_backend="fast": the Triton interpreter on CPU): dW (3C, C) and db
    (3C,) of the projection come from ONE mae_fast::linear_weight_grad launch on dq, dk, dv as
    three column parts, no mm / sum per part; against the plain path (autograd's d(qkv) merge,
    the qkv Linear's own backward); odd shape: 22 rows, C 30, head dim 6."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from mae_fast import backends
    from mae_fast.ops import mlp as mlp_ops
    if not mlp_ops._triton_runs(torch.device("cpu")):
        pytest.skip("needs triton importable and TRITON_INTERPRET=1")

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func.name(), sum(a is not None for a in args)))
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    lin = _pair(30, 5, dtype, bias)
    x = torch.randn(2, 11, 30).to(dtype)
    seen = []
    with Ops():
        out_f, grads_f = _run(x, lin, 5, fused=True, gemm_backend="fast")
    assert ("mae_fast::linear_weight_grad", 4) in seen  # dq, x, dk, dv
    assert not any(name in ("aten::mm.out", "aten::sum.IntList_out") for name, _ in seen), seen
    out_p, grads_p = _run(x, lin, 5, fused=False)
    torch.testing.assert_close(out_f, out_p, **TOL[dtype])
    for gf, gp in zip(grads_f, grads_p):
        assert gf.dtype == gp.dtype and gf.shape == gp.shape
        torch.testing.assert_close(gf, gp, **TOL[dtype])
    if dtype == torch.float32:  # a dtype the kernel does not take keeps the cuBLAS code
        seen.clear()
        with Ops():
            _run(x.double(), lin.double(), 5, fused=True, gemm_backend="fast")
        assert not any(name == "mae_fast::linear_weight_grad" for name, _ in seen)
        assert [name for name, _ in seen].count("aten::mm.out") == 3
    backends.clear_cache()


def test_fused_matches_the_math_oracle_in_float64():
    """Against the reference (math) attention, in float64: the fused backward's three-GEMM sums
    are the same math."""
    B, M, C, H = 2, 9, 12, 3
    lin = _pair(C, H, torch.float64)
    x = torch.randn(B, M, C, dtype=torch.float64)
    out_f, grads_f = _run(x, lin, H, fused=True)
    out_r, grads_r = _run(x, lin, H, fused=False, backend="math")
    torch.testing.assert_close(out_f, out_r)
    for gf, gr in zip(grads_f, grads_r):
        torch.testing.assert_close(gf, gr)


def test_fused_under_cpu_autocast_matches_plain():
    """bf16 autocast with fp32 weights: the same casts as autocast's, fp32 gradients."""
    B, M, C, H = 3, 7, 12, 3
    lin = _pair(C, H, torch.float32)
    x = torch.randn(B, M, C)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(x, lin, H, fused=fused))
    (out_f, grads_f), (out_p, grads_p) = results
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p, **TOL[torch.bfloat16])
    for gf, gp in zip(grads_f, grads_p):
        assert gf.dtype == gp.dtype == torch.float32
        torch.testing.assert_close(gf, gp, **TOL[torch.bfloat16])


def test_xformers_layout(monkeypatch):
    """The xformers backend (BMHK views of qkv, gradients in BMHK memory): emulated here by
    SDPA on the BMHK views, so the fused backward's BMHK path is exercised without xformers."""
    def fake_xformers(xops, q, k, v, scale):  # q, k, v (B, M, H, K)
        B, M, H, K = q.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)  # (B, H, M, K)
        return out.transpose(1, 2).reshape(B, M, H * K)

    monkeypatch.setattr(attention, "_xformers_attention", fake_xformers)
    monkeypatch.setattr(attention, "_resolve", lambda qkv, *a, **k: ("xformers", None))
    lin = _pair(20, 4, torch.float32)
    x = torch.randn(2, 9, 20)
    out_f, grads_f = _run(x, lin, 4, fused=True)
    monkeypatch.undo()
    out_p, grads_p = _run(x, lin, 4, fused=False)
    torch.testing.assert_close(out_f, out_p, **TOL[torch.float32])
    for gf, gp in zip(grads_f, grads_p):
        torch.testing.assert_close(gf, gp, **TOL[torch.float32])


def test_plain_path_where_fusing_does_not_apply():
    """Hooks on the projection, a replaced projection, no grad, the math backend: plain path."""
    lin = _pair(12, 3, torch.float32)
    x = torch.randn(2, 5, 12, requires_grad=True)
    seen = []
    handle = lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    attention.qkv_attention(x, lin, 3, 0.5, backend="sdpa").sum().backward()
    handle.remove()
    assert seen == [(2, 5, 36)]  # the hook ran: the module was called
    out = attention.qkv_attention(x, lin, 3, 0.5, backend="math")
    assert out.grad_fn is not None and "QKVAttention" not in type(out.grad_fn).__name__
    fused = attention.qkv_attention(x, lin, 3, 0.5, backend="sdpa")
    assert "QKVAttention" in type(fused.grad_fn).__name__
    with torch.no_grad():
        assert attention.qkv_attention(x, lin, 3, 0.5, backend="sdpa").grad_fn is None
    with pytest.raises(ValueError, match="divisible"):
        attention.qkv_attention(torch.randn(2, 5, 12, requires_grad=True), _pair(12, 3, torch.float32),
                                5, 0.5, backend="sdpa")


def test_block_switch_and_torch_compile_fullgraph():
    """``Attention.fused_qkv`` switches the path; torch.compile(fullgraph=True) traces the block
    (the plain path under compilation) and gives the same gradients."""
    torch.manual_seed(0)
    blk = Block(16, 4, mlp_ratio=2.0, qkv_bias=True)
    x = torch.randn(2, 7, 16)
    grads = {}
    for name, fn in (("fused", blk), ("compiled", torch.compile(blk, fullgraph=True, backend="aot_eager"))):
        blk.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        fn(xi).square().sum().backward()
        grads[name] = [xi.grad] + [p.grad for p in blk.parameters()]
    blk.attn.fused_qkv = False
    blk.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    blk(xi).square().sum().backward()
    grads["plain"] = [xi.grad] + [p.grad for p in blk.parameters()]
    for name in ("fused", "compiled"):
        for a, b in zip(grads[name], grads["plain"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_saved_activations_do_not_grow():
    """What the fused path keeps for backward is what the plain path keeps: the projection's
    input and weight, and the attention's own saved tensors (q, k, v views of the qkv buffer,
    out, log-sum-exp)."""
    torch.manual_seed(0)
    attn = Attention(24, num_heads=4, qkv_bias=True)
    attn.backend = "sdpa"
    x = torch.randn(3, 13, 24, requires_grad=True)
    sizes = {}
    for fused in (True, False):
        attn.fused_qkv = fused
        sizes[fused], _ = _saved_bytes(lambda: attn(x))
    assert sizes[True] <= sizes[False]


def test_accounting_shows_the_merge_gone():
    """On meta, the fused block's backward has no stack / reshape copy and moves fewer bytes in
    the attention region; FLOPs are unchanged."""
    B, M, C, H = 4, 33, 64, 4
    counts = {}
    for fused in (True, False):
        with torch.device("meta"):
            attn = Attention(C, num_heads=H, qkv_bias=True).to(torch.bfloat16)
        attn.fused_qkv = fused
        attn.backend = "sdpa"
        x = torch.empty(B, M, C, device="meta", dtype=torch.bfloat16, requires_grad=True)
        c = accounting.TrafficCounter()
        with accounting.instrument_mae(c), c:
            out = attn(x)
            c.phase = "bwd"
            out.backward(torch.empty_like(out))
        counts[fused] = c
    fused_ops = [r.op for r in counts[True].log if r.phase == "bwd"]
    plain_ops = [r.op for r in counts[False].log if r.phase == "bwd"]
    assert "aten::stack" in plain_ops and "aten::clone" in plain_ops
    assert "aten::stack" not in fused_ops and "aten::clone" not in fused_ops
    assert counts[True].total().flops == counts[False].total().flops
    merge = 2 * 2 * 3 * B * M * C * 2  # stack + copy, each reads and writes dq, dk, dv
    extra = 2 * 2 * B * M * C * 2 + 2 * B * M * C * 2  # dx accumulated twice, x read twice more
    assert counts[False].total().bytes - counts[True].total().bytes == merge - extra


def test_model_switch_and_info():
    """``model.set_fused_blocks(False)`` gives the plain blocks (same loss and gradients) and
    ``python -m mae_fast.info`` says which block implementation runs."""
    from mae_fast import info
    from mae_fast.model import MaskedAutoencoderViT
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                               mlp_ratio=2.0, attn_backend="sdpa")
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    results = {}
    for fused in (True, False):
        mae.set_fused_blocks(fused)
        assert all(b.attn.fused_qkv is fused for b in list(mae.blocks) + list(mae.decoder_blocks))
        mae.zero_grad(set_to_none=True)
        loss = mae(imgs, noise=noise)[0]
        loss.backward()
        results[fused] = [loss.detach()] + [p.grad for p in mae.parameters() if p.grad is not None]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert "set_fused_blocks(False)" in info.report()
    # what a whole step keeps for backward (its activation memory) does not grow
    saved = {}
    for fused in (True, False):
        mae.set_fused_blocks(fused)
        saved[fused], _ = _saved_bytes(lambda: mae(imgs, noise=noise)[0])
    assert saved[True] <= saved[False]


def test_second_backward_is_a_clear_error():
    lin = _pair(12, 3, torch.float32)
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = attention.qkv_attention(x, lin, 3, 0.5, backend="sdpa").sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()
