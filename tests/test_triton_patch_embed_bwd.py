"""The encoder input's backward ops against the reference (autograd through
``mae_fast.reference.patch_embed_masked``), run by the Triton interpreter on CPU
(TRITON_INTERPRET=1, set in conftest; the tests that take ``device`` also run compiled on CUDA
tensors in the CUDA lane, tests/_lane.py):
  split mode  ``mae_fast::add_pos_cls_backward`` (one kernel: contiguous grad_x + grad_cls);
  gemm mode   ``mae_fast::patch_embed_gemm_backward`` (one kernel: grad_weight with the gather
              as its prologue, grad_bias, grad_cls)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mae_fast import ops, reference
from mae_fast.ops import patch_embed as pe
from _lane import lane_device

pytestmark = pytest.mark.skipif(not pe._triton_runs(lane_device()),
                                reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("tokens", "imgs", "weight", "bias", "pos_embed", "cls_token")

# patch, in_chans, (H, W), batch, mask ratio, all inputs require grad (imgs and pos_embed too)
CASES = [
    (4, 3, (8, 12), 3, 0.75, False),
    (8, 1, (16, 8), 1, 0.0, True),
    (14, 3, (14, 28), 3, 0.0, False),
    (14, 1, (28, 14), 1, 0.75, True),
]


def _kept(N, L, mask_ratio):
    return reference.masking_indices(torch.rand(N, L), reference.num_keep(L, mask_ratio))[0]


def _inputs(p, C, hw, N, ratio, dtype, all_grads, D=40):
    L = (hw[0] // p) * (hw[1] // p)
    imgs = torch.randn(N, C, *hw).to(dtype)
    if N == 3:
        imgs = imgs.to(memory_format=torch.channels_last)
    weight = (torch.randn(D, C, p, p) * 0.05).to(dtype)
    bias = torch.randn(D).to(dtype)
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D)  # fp32, as the model's
    tensors = [imgs, weight, bias, pos_embed, cls_token]
    for i, t in enumerate(tensors):
        t.requires_grad_(all_grads or i not in (0, 3))  # imgs and pos_embed: frozen in MAE
    return tensors, _kept(N, L, ratio)


def _outputs_and_grads(fn, tensors, ids_keep, grad_out):
    out = fn(*tensors, ids_keep)
    wanted = [t for t in tensors if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [out] + [next(grads) if t.requires_grad else None for t in tensors]


@pytest.mark.parametrize("mode", ["split", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p, C, hw, N, ratio, all_grads", CASES)
def test_forward_and_backward_match_reference(p, C, hw, N, ratio, all_grads, dtype, mode, monkeypatch, device):
    """fp32 within 1e-5 (relative to the largest value); fp16/bf16 by the flash-attention rule:
    the error against the fp32 reference is at most 2x the reference's own error in that dtype,
    plus one bf16 ulp (the interpreter truncates fp32 -> bf16, see docs/TRITON.md)."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", mode)
    tensors, ids_keep = _inputs(p, C, hw, N, ratio, dtype, all_grads)
    fast = lambda *a: ops.patch_embed_masked(*a, backend="fast")  # noqa: E731
    ref_out = reference.patch_embed_masked(*tensors, ids_keep)
    grad_out = torch.randn_like(ref_out)
    got = _outputs_and_grads(fast, tensors, ids_keep, grad_out)
    want = _outputs_and_grads(reference.patch_embed_masked, tensors, ids_keep, grad_out)
    for name, g, w in zip(NAMES, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == w.dtype and g.shape == w.shape, name
    if dtype == torch.float32:
        for name, g, w in zip(NAMES, got, want):
            if g is not None:
                torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-5,
                                           msg=lambda m: f"{name}: {m}")
        return
    exact_tensors = [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]
    exact = _outputs_and_grads(reference.patch_embed_masked, exact_tensors, ids_keep, grad_out)
    for name, g, w, e in zip(NAMES, got, want, exact):
        if g is None:
            continue
        err_fast, err_torch = (g.float() - e).abs().max().item(), (w.float() - e).abs().max().item()
        floor = 2.0 ** -7 * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"{name}: {err_fast} > 2 * {err_torch} + {floor}"


def test_add_pos_cls_backward_op(device):
    """grad_x is grad_out's kept rows, contiguous, in x's dtype (exact for fp32/fp16, the
    interpreter's truncating bf16 cast within one ulp); grad_cls the fp32 batch sum of row 0.
    Read from a strided view of grad_out."""
    N, K, D = 5, 4, 33
    base = torch.randn(N, 1 + K, 2 * D)
    grad_out = base[:, :, ::2]  # (N, 1+K, D), stride 2 along D
    want_cls = grad_out[:, :1].double().sum(0, keepdim=True)
    for x_dtype in DTYPES:
        grad_x, grad_cls = pe.add_pos_cls_backward(grad_out, x_dtype, torch.float32)
        assert grad_x.shape == (N, K, D) and grad_x.is_contiguous() and grad_x.dtype == x_dtype
        if x_dtype == torch.bfloat16:
            torch.testing.assert_close(grad_x.float(), grad_out[:, 1:], atol=0, rtol=2.0 ** -7)
        else:
            assert torch.equal(grad_x, grad_out[:, 1:].to(x_dtype))
        assert grad_cls.shape == (1, 1, D) and grad_cls.dtype == torch.float32
        torch.testing.assert_close(grad_cls.double(), want_cls, atol=1e-6, rtol=1e-6)
    _, grad_cls16 = pe.add_pos_cls_backward(grad_out, torch.float32, torch.float16)
    assert grad_cls16.dtype == torch.float16


@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_gemm_backward_op_against_float64(compute_dtype, device):
    """grad_weight = grad_tokens^T @ patches, grad_bias = column sums of grad_tokens (both with
    grad_tokens rounded to the compute dtype, as the GEMM sees them), grad_cls = batch sum of
    row 0; more rows than one 32-row step, D and C*p*p not multiples of the 64-wide tiles."""
    N, C, H, W, p, D = 3, 3, 24, 16, 4, 70
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W).to(compute_dtype)
    ids_keep = _kept(N, L, 0.5)
    grad_out = torch.randn(N, 1 + ids_keep.shape[1], D)
    got = pe.patch_embed_gemm_backward(grad_out, imgs, ids_keep, [D, C, p, p], compute_dtype,
                                       torch.float32, torch.float32, torch.float32)
    grad_tokens = grad_out[:, 1:].to(compute_dtype).double()
    patches = pe.gather_patches(imgs, ids_keep, p).double()
    want = (torch.einsum("nkd,nke->de", grad_tokens, patches).reshape(D, C, p, p),
            grad_tokens.sum((0, 1)), grad_out[:, :1].double().sum(0, keepdim=True))
    for name, g, w in zip(("weight", "bias", "cls"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        # fp32 sums of products of compute-dtype values (the interpreter truncates fp32 -> bf16
        # where torch rounds: a bf16 grad_tokens element may differ by one ulp)
        rel = 1e-5 if compute_dtype != torch.bfloat16 or name == "cls" else 2.0 ** -7
        torch.testing.assert_close(g.double(), w, atol=rel * w.abs().max().item(), rtol=rel,
                                   msg=lambda m: f"{name}: {m}")


def test_backward_ops_are_deterministic(device):
    """Each output tile is reduced by one program in a fixed row order: two runs bit-equal."""
    N, C, H, W, p, D = 3, 3, 24, 16, 4, 70
    L = (H // p) * (W // p)
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.25)
    grad_out = torch.randn(N, 1 + ids_keep.shape[1], D)
    for compute_dtype in (torch.float32, torch.bfloat16):
        args = (grad_out, imgs, ids_keep, [D, C, p, p], compute_dtype, torch.float32,
                torch.float32, torch.float32)
        for a, b in zip(pe.patch_embed_gemm_backward(*args), pe.patch_embed_gemm_backward(*args)):
            assert torch.equal(a, b)
    for a, b in zip(pe.add_pos_cls_backward(grad_out, torch.float32, torch.float32),
                    pe.add_pos_cls_backward(grad_out, torch.float32, torch.float32)):
        assert torch.equal(a, b)


def test_torch_fallback_of_the_backward_ops(monkeypatch, device):
    """Off-Triton devices run torch code in the op bodies: it agrees with the kernels."""
    N, C, H, W, p, D = 2, 3, 8, 12, 4, 16
    L = (H // p) * (W // p)
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.5)
    grad_out = torch.randn(N, 1 + ids_keep.shape[1], D)
    gemm_args = (grad_out, imgs, ids_keep, [D, C, p, p], torch.float32, torch.float32,
                 torch.float32, torch.float32)
    triton_out = (*pe.add_pos_cls_backward(grad_out, torch.float32, torch.float32),
                  *pe.patch_embed_gemm_backward(*gemm_args))
    monkeypatch.setattr(pe, "_triton_runs", lambda device: False)
    torch_out = (*pe.add_pos_cls_backward(grad_out, torch.float32, torch.float32),
                 *pe.patch_embed_gemm_backward(*gemm_args))
    for a, b in zip(triton_out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck_backward_ops(device):
    N, C, H, W, p, D = 2, 3, 8, 12, 4, 16
    L = (H // p) * (W // p)
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.5)
    grad_out = torch.randn(N, 1 + ids_keep.shape[1], D)
    torch.library.opcheck(pe.add_pos_cls_backward, (grad_out, torch.bfloat16, torch.float32))
    torch.library.opcheck(pe.patch_embed_gemm_backward,
                          (grad_out, imgs, ids_keep, [D, C, p, p], torch.float32, torch.float32,
                           torch.float32, torch.float32))


def test_meta_shapes_of_the_backward_ops():
    grad_out = torch.empty(4, 7, 32, device="meta")
    imgs = torch.empty(4, 3, 16, 24, device="meta", dtype=torch.bfloat16)
    ids_keep = torch.empty(4, 6, dtype=torch.long, device="meta")
    grad_x, grad_cls = torch.ops.mae_fast.add_pos_cls_backward(grad_out, torch.bfloat16, torch.float32)
    assert grad_x.shape == (4, 6, 32) and grad_x.dtype == torch.bfloat16 and grad_x.is_contiguous()
    assert grad_cls.shape == (1, 1, 32) and grad_cls.dtype == torch.float32
    grads = torch.ops.mae_fast.patch_embed_gemm_backward(grad_out, imgs, ids_keep, [32, 3, 4, 4],
                                                         torch.bfloat16, torch.float32,
                                                         torch.float16, torch.float32)
    assert [tuple(g.shape) for g in grads] == [(32, 3, 4, 4), (32,), (1, 1, 32)]
    assert [g.dtype for g in grads] == [torch.float32, torch.float16, torch.float32]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (getattr(func, "is_view", False) or func.name() in ("aten::detach", "aten::empty.memory_format")):
            self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, want", [
    ("split", ["mae_fast::add_pos_cls_backward", "aten::mm", "aten::sum.dim_IntList"]),
    ("gemm", ["mae_fast::patch_embed_gemm_backward"]),
])
def test_backward_launches(mode, want, monkeypatch):
    """On meta tensors (as mae_fast.accounting counts), MAE's case (frozen images and pos_embed):
    the gemm mode's backward is one op; the split mode's is the epilogue op + the linear's."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", mode)
    meta = torch.device("meta")
    N, C, H, W, p, D, K = 2, 3, 16, 16, 4, 32, 4
    weight = torch.empty(D, C, p, p, device=meta, requires_grad=True)
    bias = torch.empty(D, device=meta, requires_grad=True)
    cls_token = torch.empty(1, 1, D, device=meta, requires_grad=True)
    pos_embed = torch.empty(1, 1 + (H // p) * (W // p), D, device=meta)
    tokens = ops.patch_embed_masked(torch.empty(N, C, H, W, device=meta), weight, bias, pos_embed,
                                    cls_token, torch.zeros(N, K, dtype=torch.long, device=meta),
                                    backend="fast")
    grad_out = torch.empty_like(tokens)
    counter = _OpCounter()
    with counter:
        tokens.backward(grad_out)
    launched = [op for op in counter.ops if not op.startswith("aten::empty")]
    assert launched == want


@pytest.mark.parametrize("mode", ["split", "gemm"])
def test_torch_compile_fullgraph_backward(mode, monkeypatch, device):
    """The backward ops trace under torch.compile(fullgraph=True) (aot_eager) and give the
    reference's gradients."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", mode)
    p, N, C, H, W, D = 4, 2, 3, 8, 12, 16
    L = (H // p) * (W // p)
    params = [torch.randn(D, C, p, p, requires_grad=True), torch.randn(D, requires_grad=True),
              torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)]
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.5)
    compiled = torch.compile(lambda i, k: ops.patch_embed_masked(i, *params, k, backend="fast"),
                             fullgraph=True, backend="aot_eager")
    trainable = [params[0], params[1], params[3]]
    got = torch.autograd.grad(compiled(imgs, ids_keep).square().sum(), trainable)
    want = torch.autograd.grad(reference.patch_embed_masked(imgs, *params, ids_keep).square().sum(),
                               trainable)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # many random cases: the main lane only (`make test-compat` deselects it)
def test_backward_ops_fuzz_against_float64():
    """200 seeded random cases per backward op: patch, channels, grid (with a leftover row that
    Conv2d drops), batch, keep count (0 included), D, compute dtype, image layout, int32/int64
    ids, strided grad_out."""
    import random
    rng = random.Random(2024)
    for case in range(200):
        p = rng.choice([1, 2, 3, 4, 5, 8])
        C, N, D = rng.randint(1, 4), rng.randint(1, 3), rng.choice([1, 5, 16, 33, 70])
        h, w = rng.randint(1, 3), rng.randint(1, 3)
        L = h * w
        K = rng.randint(0, L)
        compute_dtype = rng.choice(DTYPES)
        imgs = torch.randn(N, C, h * p + rng.choice([0, 1]), w * p).to(compute_dtype)
        if rng.random() < 0.5:
            imgs = imgs.to(memory_format=torch.channels_last)
        ids_keep = torch.stack([torch.randperm(L)[:K] for _ in range(N)])
        if rng.random() < 0.3:
            ids_keep = ids_keep.int()
        grad_out = torch.randn(N, 1 + K, 2 * D)[:, :, ::2] if rng.random() < 0.5 \
            else torch.randn(N, 1 + K, D)
        what = f"case {case}: p={p} C={C} N={N} L={L} K={K} D={D} {compute_dtype}"

        grad_x, grad_cls = pe.add_pos_cls_backward(grad_out, compute_dtype, torch.float32)
        assert grad_x.is_contiguous(), what
        torch.testing.assert_close(grad_x.float(), grad_out[:, 1:].to(compute_dtype).float(),
                                   atol=0, rtol=2.0 ** -7 if compute_dtype == torch.bfloat16 else 0,
                                   msg=lambda m: f"{what}: grad_x {m}")
        want_cls = grad_out[:, :1].double().sum(0, keepdim=True)
        torch.testing.assert_close(grad_cls.double(), want_cls, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: grad_cls {m}")

        got = pe.patch_embed_gemm_backward(grad_out, imgs, ids_keep, [D, C, p, p], compute_dtype,
                                           torch.float32, torch.float32, torch.float32)
        grad_tokens = grad_out[:, 1:].to(compute_dtype).double()
        patches = pe.gather_patches(imgs, ids_keep, p).double()
        want = (torch.einsum("nkd,nke->de", grad_tokens, patches).reshape(D, C, p, p),
                grad_tokens.sum((0, 1)), want_cls)
        # error bound of each sum: rel x the sum of the magnitudes of its terms (the interpreter
        # truncates fp32 -> bf16 where torch rounds: each bf16 term may be one ulp off)
        rel = 2.0 ** -7 if compute_dtype == torch.bfloat16 else 1e-5
        magnitudes = (torch.einsum("nkd,nke->de", grad_tokens.abs(), patches.abs()).reshape(D, C, p, p),
                      grad_tokens.abs().sum((0, 1)), grad_out[:, :1].double().abs().sum(0, keepdim=True))
        for name, g, w, m in zip(("weight", "bias", "cls"), got, want, magnitudes):
            assert g.dtype == torch.float32 and g.shape == w.shape, f"{what}: {name}"
            bad = (g.double() - w).abs() > rel * m + 1e-6
            assert not bad.any(), f"{what}: {name} off by {(g.double() - w).abs().max().item()}"
