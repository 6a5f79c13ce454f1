"""Attention backends (mae_fast.attention) against the math reference, and how one is chosen.

* sdpa and math on CPU against timm 0.3.2's attention computed in float64: tight in fp64/fp32,
  flash-attention's rule in bf16/fp16 (the path's error is at most 2x that of PyTorch computing
  the same math in that precision), forward and backward, odd head counts/dims and lengths.
* The xformers branch through a test double of ``xformers.ops`` that checks the BMHK contract
  (q, k, v are (B, M, H, K) strided views of the qkv projection, no copy) and computes with math.
* The choice: not installed, broken install, CPU tensors, inputs xformers rejects, env override,
  explicit-but-unavailable errors, one warning per reason.
* The whole model: same loss and gradients with sdpa, math (and the xformers double); attention
  maps with the right shapes and rows summing to 1.
"""
import dataclasses
import importlib
import importlib.util
import re
import sys
import types
import warnings

import pytest
import torch

import mae_fast
from mae_fast import attention as A
from mae_fast import backends, reference
from mae_fast.backends import Choice

# (B, M, H, K): odd lengths (50, 197 = 1 + 14*14, 1 + 49), odd head counts and head dims
SHAPES = [(2, 50, 3, 7), (1, 197, 4, 16), (3, 1 + 49, 5, 12)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    A._clear_caches()
    yield
    A._clear_caches()


def timm_attention(qkv, num_heads, scale):
    """timm 0.3.2's Attention.forward after the qkv projection, written out independently of
    mae_fast.attention's layout code: qkv (B, N, 3*C) -> (B, N, C)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def make_qkv(B, M, H, K, dtype):
    return torch.randn(B, M, 3 * H * K, dtype=torch.float64).to(dtype).requires_grad_()


def fwd_bwd(fn, qkv, grad_out):
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), qkv.grad


# ---------------------------------------------------------------------------------------------
# a test double for xformers.ops: honours the BMHK contract, computes with math


@dataclasses.dataclass
class FakeInputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_bias: object = None
    p: float = 0.0
    scale: object = None


class FakeXops(types.ModuleType):
    """``xformers.ops`` as far as mae_fast uses it. Its dispatcher accepts fp32/fp16/bf16 and
    head dims up to 64 on any device, and words its refusals like xformers 0.0.35 does."""

    SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    MAX_K = 64

    def __init__(self):
        super().__init__("xformers.ops")
        self.calls = []
        self.fmha = types.SimpleNamespace(
            Inputs=FakeInputs,
            dispatch=types.SimpleNamespace(_dispatch_fw=self._dispatch, _dispatch_bw=self._dispatch))

    def _dispatch(self, inp, needs_gradient):
        reasons = []
        if inp.query.dtype not in self.SUPPORTED_DTYPES:
            reasons.append(f"dtype={inp.query.dtype} (supported: {set(self.SUPPORTED_DTYPES)})")
        if inp.query.shape[-1] > self.MAX_K:
            reasons.append(f"max(query.shape[-1], value.shape[-1]) > {self.MAX_K}")
        if reasons:
            raise NotImplementedError(
                "No operator found for `memory_efficient_attention_forward` with inputs:\n"
                f"     query       : shape={tuple(inp.query.shape)} ({inp.query.dtype})\n"
                f"     key         : shape={tuple(inp.key.shape)} ({inp.key.dtype})\n"
                f"     value       : shape={tuple(inp.value.shape)} ({inp.value.dtype})\n"
                "     attn_bias   : <class 'NoneType'>\n     p           : 0.0\n"
                "`fakeF` is not supported because:\n    " + "\n    ".join(reasons))
        return "fakeF"

    def memory_efficient_attention(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
        assert query.dim() == 4 and query.shape == key.shape == value.shape, "BMHK: q, k, v (B, M, H, K)"
        assert attn_bias is None and p == 0.0
        assert all(t.stride(-1) == 1 for t in (query, key, value)), "xformers needs stride 1 in K"
        self.calls.append(dict(query=query, key=key, value=value, scale=scale))
        # (B, M, H, K) -> (B, H, M, K) for the math, and back
        out, _ = reference.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
        return out.transpose(1, 2)


@pytest.fixture
def fake_xformers(monkeypatch):
    pkg = types.ModuleType("xformers")
    pkg.__version__ = "0.0.0+fake"
    pkg.__path__ = []
    ops = FakeXops()
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    A._clear_caches()
    return ops


@pytest.fixture
def no_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` -> ModuleNotFoundError
    A._clear_caches()


@pytest.fixture
def broken_xformers(monkeypatch):
    pkg = types.ModuleType("xformers")
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # installed, but xformers.ops fails
    A._clear_caches()


@pytest.fixture
def no_cpp_xformers(monkeypatch, fake_xformers):
    """Like xformers 0.0.35 on torch 2.14: imports, but its C++/CUDA extension did not load."""
    pkg = sys.modules["xformers"]
    pkg._has_cpp_library = False
    pkg._cpp_lib = types.SimpleNamespace(_cpp_library_load_exception=RuntimeError(
        "xFormers can't load C++/CUDA extensions. xFormers was built for:\n    PyTorch 2.10.0+cu128"))
    return fake_xformers


def attn_warnings(record):
    return [w for w in record if issubclass(w.category, A.AttentionBackendWarning)]


# ---------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}H{}K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_matches_math_exactly(backend, dtype, shape, request):
    if backend == "xformers":
        request.getfixturevalue("fake_xformers")
        if shape[3] > FakeXops.MAX_K or dtype not in FakeXops.SUPPORTED_DTYPES:
            pytest.skip("the double's dispatcher rejects this (tested below)")
    B, M, H, K = shape
    scale = K ** -0.5
    qkv = make_qkv(B, M, H, K, dtype)
    grad_out = torch.randn(B, M, H * K, dtype=torch.float64)
    out, grad = fwd_bwd(lambda x: A.attend(x, H, scale, backend=backend), qkv, grad_out)
    out_ref, grad_ref = fwd_bwd(lambda x: timm_attention(x, H, scale), qkv.double(), grad_out)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    assert out.dtype == dtype and out.shape == (B, M, H * K)
    torch.testing.assert_close(out.double(), out_ref, **tol)
    torch.testing.assert_close(grad.double(), grad_ref, **tol)


def _rounding(ref, dtype):
    """What a single rounding to ``dtype`` costs at the magnitude of ``ref`` (flash-attn's atol)."""
    return (ref.to(dtype) + 0.3 - 0.3 - ref.to(dtype)).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}H{}K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_low_precision_flash_rule(backend, dtype, shape, request):
    """error(path in dtype vs float64) <= 2 * error(PyTorch math in dtype vs float64) + rounding."""
    if backend == "xformers":
        request.getfixturevalue("fake_xformers")
        if shape[3] > FakeXops.MAX_K:
            pytest.skip("the double's dispatcher rejects this head dim")
    B, M, H, K = shape
    scale = K ** -0.5
    qkv = make_qkv(B, M, H, K, dtype)
    grad_out = torch.randn(B, M, H * K, dtype=torch.float64).to(dtype).double()
    out, grad = fwd_bwd(lambda x: A.attend(x, H, scale, backend=backend), qkv, grad_out)
    out_pt, grad_pt = fwd_bwd(lambda x: timm_attention(x, H, scale), qkv, grad_out)  # same precision
    out_ref, grad_ref = fwd_bwd(lambda x: timm_attention(x, H, scale), qkv.double(), grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    for name, got, pt, ref in (("out", out, out_pt, out_ref), ("grad qkv", grad, grad_pt, grad_ref)):
        err = (got.double() - ref).abs().max().item()
        err_pt = (pt.double() - ref).abs().max().item()
        assert err <= 2 * err_pt + _rounding(ref, dtype), (name, err, err_pt)


def test_return_attn_gives_weights(fake_xformers):
    B, M, H, K = 2, 50, 3, 7
    qkv = make_qkv(B, M, H, K, torch.float64)
    # return_attn runs math whatever backend says (only math forms the weights)
    out, attn = A.attend(qkv, H, K ** -0.5, backend="xformers", return_attn=True)
    assert not fake_xformers.calls
    assert attn.shape == (B, H, M, M)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, M, dtype=torch.float64))
    assert (attn >= 0).all()
    torch.testing.assert_close(out, timm_attention(qkv, H, K ** -0.5), atol=1e-12, rtol=1e-12)
    # the weights: row i of head h is softmax(q_i . k_j * scale) over j (timm's layout, by hand)
    q = qkv.view(B, M, 3, H, K)[:, :, 0].transpose(1, 2)
    k = qkv.view(B, M, 3, H, K)[:, :, 1].transpose(1, 2)
    torch.testing.assert_close(attn, torch.softmax(q @ k.transpose(-2, -1) * K ** -0.5, -1))


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: A.attend(torch.randn(2, 10), 2, 1.0), ValueError, r"\(B, M, 3\*num_heads\*head_dim\)"),
    (lambda: A.attend(torch.randn(2, 10, 3 * 10), 4, 1.0), ValueError, "num_heads=4"),
    (lambda: A.attend(torch.randn(2, 10, 12), 0, 1.0), ValueError, "num_heads must be a positive int"),
    (lambda: A.attend(torch.ones(2, 10, 12, dtype=torch.long), 2, 1.0), TypeError, "floating point"),
    (lambda: A.attend([[0.0]], 2, 1.0), TypeError, "torch.Tensor"),
    (lambda: A.attend(torch.randn(2, 10, 12), 2, 1.0, backend="flash"), ValueError, "must be one of"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


# ---------------------------------------------------------------------------------------------
# the xformers branch, through the double


def test_xformers_gets_bmhk_views_of_the_projection(fake_xformers):
    B, M, H, K = 2, 1 + 49, 5, 12
    C = H * K
    qkv = make_qkv(B, M, H, K, torch.float32)
    out = A.attend(qkv, H, 0.123, backend="xformers")
    (call,) = fake_xformers.calls
    assert call["scale"] == 0.123
    item = qkv.element_size()
    for i, name in enumerate(("query", "key", "value")):
        t = call[name]
        assert t.shape == (B, M, H, K)
        # a view of qkv: same storage, starts at the i-th third of a row, strides of (B, M, 3, H, K)
        assert t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr(), name
        assert t.data_ptr() == qkv.data_ptr() + i * C * item, name
        assert t.stride() == (M * 3 * C, 3 * C, K, 1), name
        assert t._base is qkv, name
    torch.testing.assert_close(out, timm_attention(qkv, H, 0.123))


def test_xformers_backward_flows_to_the_projection(fake_xformers):
    B, M, H, K = 2, 50, 3, 8
    lin = torch.nn.Linear(H * K, 3 * H * K)
    x = torch.randn(B, M, H * K)
    grads = {}
    for backend in ("xformers", "math"):
        lin.zero_grad()
        A.attend(lin(x), H, K ** -0.5, backend=backend).square().sum().backward()
        grads[backend] = lin.weight.grad.clone()
    assert len(fake_xformers.calls) == 1
    torch.testing.assert_close(grads["xformers"], grads["math"])


# ---------------------------------------------------------------------------------------------
# choosing


def test_auto_on_cuda_picks_xformers_when_it_imports(fake_xformers):
    c = backends.choose("attention", "cuda", "auto")
    assert c.impl == "xformers" and "0.0.0+fake imports" in c.reason


def test_auto_on_cpu_is_sdpa_even_with_xformers(fake_xformers):
    c = backends.choose("attention", "cpu", "auto")
    assert c.impl == "sdpa" and "CUDA only" in c.reason
    A.attend(make_qkv(2, 10, 2, 4, torch.float32), 2, 0.5)
    assert not fake_xformers.calls


def test_auto_on_rocm_is_sdpa_even_with_xformers(fake_xformers, monkeypatch):
    """A ROCm torch (torch.version.hip set): auto keeps to torch's SDPA, as the rest of mae_fast
    keeps to torch there; an explicit xformers is still honoured."""
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    A._clear_caches()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c = backends.choose("attention", "cuda", "auto")
    assert c.impl == "sdpa" and "torch.version.hip = 6.2.0" in c.reason
    assert not attn_warnings(record)
    assert backends.choose("attention", "cuda", "xformers").impl == "xformers"
    monkeypatch.setattr(torch.version, "hip", None)
    A._clear_caches()
    assert backends.choose("attention", "cuda", "auto").impl == "xformers"  # the same, on CUDA


def test_not_installed_falls_back_quietly(no_xformers):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c = backends.choose("attention", "cuda", "auto")
    assert c.impl == "sdpa" and "not installed" in c.reason
    assert not attn_warnings(record)  # a missing optional extra is not worth a warning
    assert "not installed" in backends.choose("attention", "cpu", "auto").reason


WHY = {"no_xformers": "not installed", "broken_xformers": "does not import",
       "no_cpp_xformers": "C\\+\\+/CUDA extension did not load"}


@pytest.mark.parametrize("fixture", ["broken_xformers", "no_cpp_xformers"])
def test_broken_install_falls_back_with_one_warning(fixture, request):
    request.getfixturevalue(fixture)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            c = backends.choose("attention", "cuda", "auto")
            backends.clear_cache()  # ask the chooser again, not the cache
    assert c.impl == "sdpa"
    (w,) = attn_warnings(record)
    for said in (c.reason, str(w.message)):
        assert re.search(WHY[fixture], said), said


@pytest.mark.parametrize("fixture", ["no_xformers", "broken_xformers", "no_cpp_xformers"])
def test_explicit_xformers_unavailable_is_an_error(fixture, request, monkeypatch):
    request.getfixturevalue(fixture)
    why = WHY[fixture]
    qkv = make_qkv(2, 10, 2, 4, torch.float32)
    with pytest.raises(RuntimeError, match=f"backend='xformers' asked for, but .*{why}"):
        A.attend(qkv, 2, 0.5, backend="xformers")
    monkeypatch.setenv(A.ENV, "xformers")
    with pytest.raises(RuntimeError, match=f"MAE_FAST_ATTN=xformers, but .*{why}"):
        A.attend(qkv, 2, 0.5)


def test_explicit_xformers_with_rejected_inputs_is_an_error(fake_xformers):
    qkv = make_qkv(2, 10, 2, 4, torch.float64)  # the double has no float64 operator
    with pytest.raises(RuntimeError, match=r"(?s)'xformers' asked for.*dtype=torch.float64.*fakeF"):
        A.attend(qkv, 2, 0.5, backend="xformers")
    assert not fake_xformers.calls


@pytest.fixture
def auto_says_xformers(monkeypatch, fake_xformers):
    """Where auto picks xformers (CUDA tensors), for CPU tensors: the device-level choice is
    tested above; this exercises the per-call check of the inputs that follows it."""
    real = A.choose

    def choose(op, device, backend="auto"):
        if backend == "auto" and A._env_backend() is None:
            return Choice("attention", "xformers", "as on CUDA")
        return real(op, device, backend)

    monkeypatch.setattr(A, "choose", choose)
    return fake_xformers


def test_auto_falls_back_per_input_with_one_warning_per_reason(auto_says_xformers):
    fake = auto_says_xformers
    H = 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ok = A.attend(make_qkv(2, 10, H, 4, torch.float32), H, 0.5)  # accepted
        assert len(fake.calls) == 1
        for M, heads in ((10, H), (17, H), (30, 3)):  # unsupported dtype, other shapes: one reason
            qkv = make_qkv(2, M, heads, 4, torch.float64)
            out = A.attend(qkv, heads, 0.5)
            torch.testing.assert_close(out, timm_attention(qkv, heads, 0.5), atol=1e-12, rtol=1e-12)
        for B, heads in ((1, H), (3, 1)):  # head dim too large: a second reason
            A.attend(make_qkv(B, 10, heads, 72, torch.float32), heads, 0.5)
    assert len(fake.calls) == 1  # the rejected inputs never reached xformers
    assert ok.shape == (2, 10, H * 4)
    msgs = [str(w.message) for w in attn_warnings(record)]
    assert len(msgs) == 2, msgs
    assert "dtype=torch.float64" in msgs[0] and "using torch SDPA" in msgs[0]
    assert "head_dim=72" in msgs[1] and "> 64" in msgs[1]


def test_env_override(monkeypatch, fake_xformers):
    monkeypatch.setenv(A.ENV, "math")
    c = backends.choose("attention", "cuda", "auto")
    assert (c.impl, c.reason.split(":")[0]) == ("math", "MAE_FAST_ATTN=math")
    monkeypatch.setenv(A.ENV, "sdpa")
    assert backends.choose("attention", "cuda", "auto").impl == "sdpa"
    monkeypatch.setenv(A.ENV, "xformers")  # the double runs on CPU tensors: the branch really runs
    assert backends.choose("attention", "cpu", "auto").impl == "xformers"
    A.attend(make_qkv(2, 10, 2, 4, torch.float32), 2, 0.5)
    assert len(fake_xformers.calls) == 1
    # an explicit backend beats the environment
    assert backends.choose("attention", "cpu", "sdpa").impl == "sdpa"
    assert backends.choose("attention", "cpu", "reference").impl == "math"
    monkeypatch.setenv(A.ENV, "flash")
    with pytest.raises(ValueError, match="MAE_FAST_ATTN must be one of"):
        backends.choose("attention", "cpu", "auto")


def test_model_backend_names():
    tiny = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        mae_fast.MaskedAutoencoderViT(**tiny, attn_backend="flash")
    model = mae_fast.MaskedAutoencoderViT(**tiny, attn_backend="sdpa")
    assert {blk.attn.backend for blk in list(model.blocks) + list(model.decoder_blocks)} == {"sdpa"}
    assert model.backend_choices("cpu")["attention"].impl == "sdpa"
    assert mae_fast.MaskedAutoencoderViT(**tiny, backend="reference").backend_choices("cuda")["attention"].impl == "math"


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_real_xformers_dispatcher_is_asked():
    """With the real package: mae_fast's use of xformers' (private) dispatcher still works."""
    xformers = importlib.import_module("xformers")
    xops = importlib.import_module("xformers.ops")
    loaded, why, installed = A._load_xformers()
    assert installed and (loaded is None) == (not xformers._has_cpp_library), why
    q, k, v = A._split_bmhk(make_qkv(2, 10, 2, 4, torch.float32), 2)
    reason = A._xformers_rejection(xops, q, k, v, 0.5, True)
    assert reason is not None and "device=cpu" in reason and "shape=" not in reason


# ---------------------------------------------------------------------------------------------
# the whole model

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=3,
            decoder_embed_dim=20, decoder_depth=2, decoder_num_heads=5, mlp_ratio=2.0)


def _loss_and_grads(attn_backend, imgs, noise):
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**TINY, attn_backend=attn_backend)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    return loss.detach(), pred.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_backend", ["sdpa", "xformers"])
def test_model_same_loss_and_grads_as_math(attn_backend, request):
    if attn_backend == "xformers":
        fake = request.getfixturevalue("fake_xformers")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss_m, pred_m, grads_m = _loss_and_grads("math", imgs, noise)
    loss, pred, grads = _loss_and_grads(attn_backend, imgs, noise)
    if attn_backend == "xformers":
        assert len(fake.calls) == TINY["depth"] + TINY["decoder_depth"]
    torch.testing.assert_close(loss, loss_m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pred, pred_m, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_m.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], grads_m[name], atol=1e-5, rtol=1e-4, msg=name)


def test_attention_maps():
    model = mae_fast.MaskedAutoencoderViT(**TINY, attn_backend="sdpa")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
    maps = A.attention_maps(model, imgs, mask_ratio=0.75, noise=noise)
    len_keep, L = 4, 16
    want = {f"blocks.{i}.attn": (2, 3, 1 + len_keep, 1 + len_keep) for i in range(2)}
    want.update({f"decoder_blocks.{i}.attn": (2, 5, 1 + L, 1 + L) for i in range(2)})
    assert {n: tuple(m.shape) for n, m in maps.items()} == want
    for m in maps.values():
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    # recording hooks are gone, and the model computes what it computed before
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(imgs, mask_ratio=0.75, noise=noise)[0], loss)
    # the first encoder block's map is softmax(q k^T * scale) of its input, by hand
    blk = model.blocks[0]
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    qkv = blk.attn.qkv(blk.norm1(x)).view(2, 1 + len_keep, 3, 3, 8)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    torch.testing.assert_close(maps["blocks.0.attn"], torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1))
