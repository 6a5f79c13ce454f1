"""Fused residual add + LayerNorm (mae_fast.ops.add_layer_norm, kernels/add_layer_norm.py)
against the plain ops (``x + branch`` then ``F.layer_norm``), forward and backward, in both lanes
(Triton interpreted on CPU, compiled on CUDA).

Rule (flash-attention's): in each dtype the fused op's error against an fp64 computation is at
most 2x the plain ops' own error in that dtype (plus one ulp of the values' scale, for results
the plain ops get exactly); h = x + branch is bitwise the plain sum."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.ops import layernorm
from mae_fast.ops.layernorm import add_layer_norm, add_layer_norm_backward, add_layer_norm_op

from _lane import on_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, generator):
    """Drawn on CPU (the same numbers in both lanes), then on the default device."""
    return torch.randn(*shape, generator=generator, device="cpu").to(torch.empty(0).device)


def _inputs(R, D, dtype, seed=0, branch=True, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (_randn(R, D, generator=g) * 2 + 0.5).to(dtype)
    b = (_randn(R, D, generator=g)).to(dtype) if branch else None
    weight = (1 + 0.3 * _randn(D, generator=g)).to(param_dtype or dtype)
    bias = (0.2 * _randn(D, generator=g)).to(param_dtype or dtype)
    dy = _randn(R, D, generator=g).to(dtype)
    dh = _randn(R, D, generator=g).to(dtype)
    return x, b, weight, bias, dy, dh


def _run(fn, x, branch, weight, bias, dy, dh, eps=1e-6):
    """Forward and backward of ``fn`` (either implementation) -> h, y, dx, dbranch, dw, db."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, branch, weight, bias)]
    h, y = fn(*leaves, eps)
    outs = [y] + ([h] if branch is not None else [])
    grads = [dy.to(y.dtype)] + ([dh.to(h.dtype)] if branch is not None else [])
    torch.autograd.backward(outs, grads)
    return [h.detach(), y.detach()] + [t.grad if t is not None else None for t in leaves]


def _fp64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


def _assert_within_twice_reference_error(got, ref, exact, dtype, name):
    err_got = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err_got <= 2 * err_ref + ulp, f"{name}: |fused - fp64| {err_got:.3g} vs |plain - fp64| {err_ref:.3g}"


def _fast(*args):
    return add_layer_norm(*args, backend="fast")


# widths: ViT-B / L / H and an odd small one; odd row counts
@pytest.mark.parametrize("D", [768, 1024, 1280, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_the_plain_ops(device, dtype, D):
    with on_device(device):
        x, branch, weight, bias, dy, dh = _inputs(7, D, dtype)
        got = _run(_fast, x, branch, weight, bias, dy, dh)
        ref = _run(layernorm.reference_add_layer_norm, x, branch, weight, bias, dy, dh)
        exact = _run(layernorm.reference_add_layer_norm, *_fp64(x, branch, weight, bias, dy, dh))
    assert torch.equal(got[0], ref[0])  # h: the plain sum, bitwise
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    for name, g, r, e in zip(("h", "y", "dx", "dbranch", "dweight", "dbias"), got, ref, exact):
        _assert_within_twice_reference_error(g, r, e, dtype, name)
    if dtype == torch.float32:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_branch_and_several_rows_per_backward_program(device, dtype, monkeypatch):
    """The first block's norm1 (no branch: h is x, no dh) and a backward whose programs walk
    several tiles each (the partial-sum loop) and leave 37 partials (the workspace reduction
    loops over more than its 32 rows)."""
    monkeypatch.setattr(layernorm, "MAX_BWD_PROGRAMS", 37)
    with on_device(device):
        x, _, weight, bias, dy, dh = _inputs(111, 1280, dtype, seed=1, branch=False)
        assert layernorm.bwd_programs(111, 1280) == (37, 3)  # one-row tiles at D 1280
        got = _run(_fast, x, None, weight, bias, dy, dh)
        ref = _run(layernorm.reference_add_layer_norm, x, None, weight, bias, dy, dh)
        exact = _run(layernorm.reference_add_layer_norm, *_fp64(x, None, weight, bias, dy, dh))
    for name, i in (("y", 1), ("dx", 2), ("dweight", 4), ("dbias", 5)):
        _assert_within_twice_reference_error(got[i], ref[i], exact[i], dtype, name)


def test_multi_row_tiles_in_both_kernels(device, monkeypatch):
    """Small D: tiles of 32 rows (D 40 -> BLOCK_D 64), a last tile cut short, and a backward
    program walking two tiles."""
    monkeypatch.setattr(layernorm, "MAX_BWD_PROGRAMS", 2)
    with on_device(device):
        x, branch, weight, bias, dy, dh = _inputs(111, 40, torch.float32, seed=7)
        assert layernorm.block_rows(40) == 32 and layernorm.bwd_programs(111, 40) == (2, 64)
        got = _run(_fast, x, branch, weight, bias, dy, dh)
        ref = _run(layernorm.reference_add_layer_norm, x, branch, weight, bias, dy, dh)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bwd_programs_rule():
    """(programs, rows per program): at most 512 chunks of whole tiles (2048 // BLOCK_D rows)."""
    got = [layernorm.bwd_programs(R, D) for R, D in
           ((0, 768), (1, 768), (12800, 768), (50432, 512), (1023, 1280), (7, 40))]
    assert got == [(0, 2), (1, 2), (493, 26), (505, 100), (512, 2), (1, 32)]


@pytest.mark.parametrize("stream", [torch.float32, torch.bfloat16], ids=["fp32-stream", "bf16-stream"])
def test_autocast_matches_layer_norm_under_autocast(device, stream):
    """Autocast's policy for the ops replaced: the add on no list (fp32 stream + bf16 branch ->
    fp32), layer_norm on CUDA's fp32 list (fp32 y even from a bf16 h; CPU autocast runs it as
    given): the dtypes of every output and gradient are the plain ops' under the same autocast."""
    with on_device(device):
        x, _, weight, bias, dy, dh = _inputs(5, 40, stream, seed=2, param_dtype=torch.float32)
        branch = torch.randn(5, 40).to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ref = _run(layernorm.reference_add_layer_norm, x, branch, weight, bias, dy, dh)
            got = _run(_fast, x, branch, weight, bias, dy, dh)
            exact = _run(layernorm.reference_add_layer_norm, *_fp64(x, branch, weight, bias, dy, dh))
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    if device.type == "cuda":
        assert ref[1].dtype == torch.float32
    for name, g, r, e in zip(("h", "y", "dx", "dbranch", "dweight", "dbias"), got, ref, exact):
        _assert_within_twice_reference_error(g, r, e, torch.bfloat16 if stream == torch.bfloat16 else torch.float32, name)


def test_unsupported_inputs_fall_back_or_raise():
    x, branch, weight, bias, _, _ = _inputs(3, 8, torch.float64)
    with pytest.raises(TypeError, match="backend='fast'"):
        add_layer_norm(x, branch, weight, bias, 1e-6, backend="fast")
    h, y = add_layer_norm(x, branch, weight, bias, 1e-6, backend="auto")  # reference on CPU
    torch.testing.assert_close(y, F.layer_norm(x + branch, (8,), weight, bias, 1e-6))
    x, branch, weight, bias, _, _ = _inputs(2, layernorm.MAX_WIDTH + 1, torch.float32)
    with pytest.raises(TypeError, match="width"):
        add_layer_norm(x, branch, weight, bias, 1e-6, backend="fast")
    with pytest.raises(TypeError, match="broadcasts"):
        add_layer_norm(torch.randn(2, 3, 8), torch.randn(3, 8), torch.ones(8), torch.zeros(8), 1e-6,
                       backend="fast")
    with pytest.raises(ValueError, match="one device"):
        add_layer_norm(torch.randn(2, 8), None, torch.ones(8, device="meta"), torch.zeros(8), 1e-6,
                       backend="fast")


def test_add_norm_runs_a_replaced_or_hooked_norm_as_given():
    x, branch = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm = nn.LayerNorm(8)
    calls = []
    norm.register_forward_hook(lambda *a: calls.append(1))
    layernorm.add_norm(x, branch, norm, backend="fast")
    assert calls == [1]
    rms = nn.RMSNorm(8)
    h, y = layernorm.add_norm(x, branch, rms, backend="fast")
    torch.testing.assert_close(y, rms(x + branch))


def test_opcheck():
    x, branch, weight, bias, dy, dh = _inputs(5, 40, torch.float32, seed=3)
    for args in ((x, branch, weight, bias, 1e-6, torch.float32), (x, None, weight, bias, 1e-5, torch.float32),
                 (x.bfloat16(), branch.bfloat16(), weight, bias, 1e-6, torch.float32)):
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        torch.library.opcheck(add_layer_norm_op, leaves,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    h, y, mean, rstd = add_layer_norm_op(x, branch, weight, bias, 1e-6, torch.float32)
    for args in ((dy, dh, h, weight, mean, rstd), (dy, None, h, weight, mean, rstd)):
        torch.library.opcheck(add_layer_norm_backward, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x, branch, weight, bias, _, _ = _inputs(5, 40, torch.float32, seed=4)

    def f(x, branch, weight, bias):
        h, y = add_layer_norm(x, branch, weight, bias, 1e-6, backend="fast")
        return (h * y).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, branch, weight, bias)]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (x, branch, weight, bias)]
    f(*eager).backward()
    torch.testing.assert_close([t.grad for t in leaves], [t.grad for t in eager])


# ---- in the model -----------------------------------------------------------------------------

TINY = dict(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=True)


def _tiny(backend="fast", seed=0):
    from mae_fast.model import MaskedAutoencoderViT
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**TINY, backend=backend)


def _step(model, imgs, noise, amp=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(imgs.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss, pred, _ = model(imgs, mask_ratio=0.5, noise=noise)
    loss.backward()
    return [loss.detach().float(), pred.detach().float()] + [p.grad.float() for p in model.parameters()
                                                             if p.grad is not None]


def _batch(device, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 8, 12, generator=g, device="cpu").to(device),
            torch.rand(2, 6, generator=g, device="cpu").to(device))


def test_fused_blocks_match_the_plain_blocks_and_count_their_calls(device, monkeypatch):
    """fp32: the fused stack (each residual add with the next LayerNorm) against
    set_fused_blocks(False), forward and backward; 2 * depth + 1 fused calls per block stack."""
    calls = []
    original = layernorm.add_layer_norm
    monkeypatch.setattr(layernorm, "add_layer_norm",
                        lambda *a, **k: calls.append(a[1] is not None) or original(*a, **k))
    with on_device(device):
        model = _tiny().to(device)
        imgs, noise = _batch(device)
        fused = _step(model, imgs, noise)
        # encoder: norm1, norm2, norm1 (+ block 0's last add), norm2, norm (+ the last add); decoder: 1 block
        assert calls == [False, True, True, True, True] + [False, True, True]
        model.set_fused_blocks(False)
        calls.clear()
        plain = _step(model, imgs, noise)
        assert calls == []
        model.set_fused_blocks(True)
        model.set_grad_checkpointing(True)  # per block: norm1 and norm2 fused, the last add plain
        checkpointed = _step(model, imgs, noise)
    for got in (fused, checkpointed):
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_whole_model_fast_vs_reference(device):
    """Forward + backward of the whole model under bf16 autocast, backend='fast' (fused blocks and
    glue) against backend='reference' (plain blocks): each one's error against an fp32 run of the
    reference, the fast one at most 2x the reference's (plus one bf16 ulp of the scale)."""
    with on_device(device):
        reference = _tiny("reference").to(device)
        fast = _tiny("fast").to(device)
        fast.load_state_dict(reference.state_dict())
        imgs, noise = _batch(device, seed=6)
        exact = _step(reference, imgs, noise)
        want = _step(reference, imgs, noise, amp=torch.bfloat16)
        got = _step(fast, imgs, noise, amp=torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        err_fast, err_ref = (g - e).abs().max().item(), (w - e).abs().max().item()
        assert err_fast <= 2 * err_ref + eps * e.abs().max().item(), (i, err_fast, err_ref)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "amp-bf16"])
def test_saved_activation_memory_does_not_grow(amp):
    """The fused op saves h (the LayerNorm's input), weight and the fp32 mean / rstd: what the
    plain add + native_layer_norm save, so the bytes kept for backward are the same."""
    from mae_fast.train.memory import saved_activation_bytes
    model = _tiny()
    imgs, noise = _batch("cpu")
    fused = saved_activation_bytes(model, imgs, 0.5, noise, amp_dtype=amp)
    model.set_fused_blocks(False)
    plain = saved_activation_bytes(model, imgs, 0.5, noise, amp_dtype=amp)
    assert fused <= plain, (fused, plain)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
def test_cuda_graph_capture_shows_no_host_sync(device):
    """Forward and backward (the partial sums and their reduction included) make no host sync:
    they capture in a CUDA graph, and its replay gives the eager results bitwise."""
    x, branch, weight, bias, dy, dh = _inputs(333, 768, torch.bfloat16, seed=8)

    def step():
        h, y, mean, rstd = add_layer_norm_op(x, branch, weight, bias, 1e-6, torch.bfloat16)
        return (h, y) + tuple(add_layer_norm_backward(dy, dh, h, weight, mean, rstd))

    want = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_state_dict_keys_and_info_line():
    model = _tiny()
    keys = set(model.state_dict())
    model.set_fused_blocks(False)
    assert set(model.state_dict()) == keys and "blocks.0.norm2.weight" in keys and "decoder_norm.bias" in keys
    from mae_fast.info import report
    text = report("auto")
    assert "add_layer_norm" in text and "LayerNorm" in text


# ---- the LayerNorm of the stream without the add (MAE_FAST_MLP=gemm blocks) ----------------------

def _stream_run(fn, s, weight, bias, dy, ds):
    """y, s' = fn(s) with gradients dy on y and ds on s' (the residual add's gradient) ->
    [y, ds_total, dweight, dbias]."""
    leaves = [t.detach().clone().requires_grad_() for t in (s, weight, bias)]
    norm = nn.LayerNorm(s.shape[-1], eps=1e-6).to(weight.dtype)
    norm.weight, norm.bias = nn.Parameter(leaves[1]), nn.Parameter(leaves[2])
    y, s_out = fn(leaves[0], norm)
    torch.autograd.backward([y, s_out], [dy.to(y.dtype), ds.to(s_out.dtype)])
    return [y.detach(), leaves[0].grad, norm.weight.grad, norm.bias.grad]


def _plain_stream(s, norm):
    return norm(s), s


def _fast_stream(s, norm):
    return layernorm.norm_stream(s, norm, backend="fast")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_stream_matches_the_plain_layer_norm_and_sums_the_stream_gradient(device, dtype):
    """y = LayerNorm(s) and the stream passed on: the stream's gradient is dh + LN_bwd(dy) from
    one backward kernel; 7 rows of width 40 (odd), each output and gradient within twice the
    plain ops' error against fp64."""
    with on_device(device):
        s, _, weight, bias, dy, ds = _inputs(7, 40, dtype, seed=9)
        got = _stream_run(_fast_stream, s, weight, bias, dy, ds)
        ref = _stream_run(_plain_stream, s, weight, bias, dy, ds)
        exact = _stream_run(_plain_stream, *_fp64(s, weight, bias, dy, ds))
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    for name, g, r, e in zip(("y", "ds", "dweight", "dbias"), got, ref, exact):
        _assert_within_twice_reference_error(g, r, e, dtype, name)


def test_norm_stream_passes_the_stream_on_without_a_copy_and_in_one_backward_kernel():
    """The stream output is autograd's view of the input (same memory); the backward is one
    add_layer_norm_backward with dh (no aten add of the two gradients of s)."""
    from mae_fast.accounting import TrafficCounter
    s = torch.randn(2, 3, 40, requires_grad=True)
    norm = nn.LayerNorm(40)
    y, s_out = layernorm.norm_stream(s, norm, backend="fast")
    assert s_out.data_ptr() == s.data_ptr() and s_out._base is not None and s_out.grad_fn is not None
    grads = [torch.randn_like(y), torch.randn_like(s_out)]
    with TrafficCounter() as seen:  # every dispatched op
        torch.autograd.backward([y, s_out], grads)
    kernels = [n for n in (r.op for r in seen.log) if n.startswith("mae_fast::") or n.split(".")[0] in ("aten::add", "aten::add_")]
    assert kernels == ["mae_fast::add_layer_norm_backward"], kernels
    # plain fallbacks pass s itself: a hooked norm, the reference backend
    hooked = nn.LayerNorm(40)
    hooked.register_forward_hook(lambda *a: None)
    assert layernorm.norm_stream(s, hooked, backend="fast")[1] is s
    assert layernorm.norm_stream(s, norm, backend="reference")[1] is s


def _gemm_tiny(monkeypatch):
    monkeypatch.setenv("MAE_FAST_MLP", "gemm")
    from mae_fast import backends
    backends.clear_cache()
    model = _tiny()
    assert all(b.stream_runs(torch.empty(1, 1, 32)) for b in model.blocks)
    return model


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "amp-bf16"])
def test_stream_blocks_saved_activation_memory_does_not_grow(amp, monkeypatch):
    """MAE_FAST_MLP=gemm: the stream blocks (adds in the GEMM epilogues, LayerNorms without the
    add) keep no more for backward than the plain blocks, with the same MLP GEMMs or with the
    default MLP: each LayerNorm's input and stats, each Linear's input, nothing for the adds."""
    from mae_fast import backends
    from mae_fast.train.memory import saved_activation_bytes
    imgs, noise = _batch("cpu")
    model = _gemm_tiny(monkeypatch)
    stream = saved_activation_bytes(model, imgs, 0.5, noise, amp_dtype=amp)
    model.set_fused_blocks(False)
    plain_gemm = saved_activation_bytes(model, imgs, 0.5, noise, amp_dtype=amp)
    monkeypatch.setenv("MAE_FAST_MLP", "plain")
    backends.clear_cache()
    plain = saved_activation_bytes(model, imgs, 0.5, noise, amp_dtype=amp)
    assert stream <= plain_gemm and stream <= plain, (stream, plain_gemm, plain)


def test_stream_blocks_bf16_autocast_whole_model_fast_vs_reference(device, monkeypatch):
    """As test_bf16_autocast_whole_model_fast_vs_reference, with MAE_FAST_MLP=gemm (the stream
    blocks: residual adds in the proj / fc2 epilogues), grad checkpointing on too (each block
    recomputed: the stream form runs per block)."""
    with on_device(device):
        reference = _tiny("reference").to(device)
        fast = _gemm_tiny(monkeypatch).to(device)
        fast.load_state_dict(reference.state_dict())
        imgs, noise = _batch(device, seed=6)
        exact = _step(reference, imgs, noise)
        want = _step(reference, imgs, noise, amp=torch.bfloat16)
        got = _step(fast, imgs, noise, amp=torch.bfloat16)
        fast.set_grad_checkpointing(True)
        checkpointed = _step(fast, imgs, noise, amp=torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        err_fast, err_ref = (g - e).abs().max().item(), (w - e).abs().max().item()
        assert err_fast <= 2 * err_ref + eps * e.abs().max().item(), (i, err_fast, err_ref)
    torch.testing.assert_close(checkpointed, got, rtol=1e-5, atol=1e-6)  # fp32 grad sums: order
