"""The Triton encoder-input path (gather of kept patches + pos/cls epilogue) against the
reference, run on CPU by the Triton interpreter (TRITON_INTERPRET=1, set in conftest); the tests
that take ``device`` also run compiled on CUDA tensors in the CUDA lane (tests/_lane.py)."""
import random

import pytest
import torch

from mae_fast import ops, reference
from mae_fast.backends import choose
from mae_fast.ops import patch_embed as pe
from _lane import lane_device

pytestmark = pytest.mark.skipif(not pe._triton_runs(lane_device()),
                                reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# atol, rtol of the embedded tokens against the reference in the same dtype (GEMM vs conv)
TOL = {torch.float32: (1e-5, 1.3e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1.6e-2)}


def _images(N, C, H, W, dtype, channels_last):
    imgs = torch.randn(N, C, H, W).to(dtype)
    return imgs.to(memory_format=torch.channels_last) if channels_last else imgs


def _kept(N, L, mask_ratio):
    return reference.masking_indices(torch.rand(N, L), reference.num_keep(L, mask_ratio))[0]


def _expected_patches(imgs, ids_keep, p):
    """From the oracle's patchify ((h, w, p, q, c) order) to the Conv2d weight's (c, p, q)."""
    N, C = imgs.shape[:2]
    rows = reference.patchify(imgs, p)  # (N, L, p*p*C)
    L = rows.shape[1]
    rows = rows.reshape(N, L, p, p, C).permute(0, 1, 4, 2, 3).reshape(N, L, C * p * p)
    return torch.stack([rows[n, ids_keep[n]] for n in range(N)])  # (N, K, C*p*p)


# patch, in_chans, (H, W), batch, mask ratio: every listed value of each axis appears
CASES = [
    (4, 3, (8, 8), 1, 0.75),
    (4, 1, (12, 8), 3, 0.0),
    (8, 4, (16, 24), 3, 0.5),
    (8, 3, (16, 16), 1, 0.9),
    (14, 3, (28, 14), 1, 0.5),
    (14, 1, (28, 28), 3, 0.75),
    (16, 3, (32, 32), 1, 0.75),
    (16, 4, (16, 32), 3, 0.9),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p, C, hw, N, ratio", CASES)
def test_gather_is_bit_exact(p, C, hw, N, ratio, dtype, channels_last, device):
    imgs = _images(N, C, *hw, dtype, channels_last)
    ids_keep = _kept(N, (hw[0] // p) * (hw[1] // p), ratio)
    got = pe.gather_patches(imgs, ids_keep, p)
    assert got.dtype == dtype
    assert torch.equal(got, _expected_patches(imgs, ids_keep, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p, C, hw, N, ratio", CASES)
def test_patch_embed_matches_reference_forward_and_backward(p, C, hw, N, ratio, dtype, device):
    L, D = (hw[0] // p) * (hw[1] // p), 24
    imgs = _images(N, C, *hw, dtype, channels_last=(C == 3)).requires_grad_()
    weight = (torch.randn(D, C, p, p) * 0.05).to(dtype).requires_grad_()
    bias = torch.randn(D).to(dtype).requires_grad_()
    pos_embed = torch.randn(1, 1 + L, D).requires_grad_()  # fp32, as the model's
    cls_token = torch.randn(1, 1, D).requires_grad_()
    ids_keep = _kept(N, L, ratio)
    args = (imgs, weight, bias, pos_embed, cls_token, ids_keep)
    got = ops.patch_embed_masked(*args, backend="fast")
    want = reference.patch_embed_masked(*args)
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    grad_out = torch.randn_like(want)
    inputs = [imgs, weight, bias, pos_embed, cls_token]
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    for name, g, w in zip(["imgs", "weight", "bias", "pos_embed", "cls_token"], got_grads, want_grads):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, atol=atol * scale * 4, rtol=rtol * 4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_backward_scatters_bit_exact(dtype, channels_last, device):
    p, N, C, H, W = 4, 3, 3, 12, 8
    imgs = _images(N, C, H, W, dtype, channels_last).requires_grad_()
    ids_keep = _kept(N, (H // p) * (W // p), 0.5)
    grad = torch.randn(N, ids_keep.shape[1], C * p * p).to(dtype)
    (got,) = torch.autograd.grad(pe.gather_patches(imgs, ids_keep, p), imgs, grad)
    (want,) = torch.autograd.grad(_expected_patches(imgs, ids_keep, p), imgs, grad)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.slow  # many random cases: the main lane only (`make test-compat` deselects it)
def test_gather_fuzz_bit_exact():
    """200 seeded random cases: patch, channels, grid, batch, keep count, dtype, layout,
    int32/int64 indices; forward gather and backward scatter both bit-exact."""
    rng = random.Random(1234)
    for case in range(200):
        p = rng.choice([1, 2, 3, 4, 5, 8])
        C = rng.randint(1, 5)
        h, w, N = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        H, W = h * p + rng.choice([0, 0, 1]), w * p  # an odd leftover row is dropped, as Conv2d
        L = h * w
        K = rng.randint(0, L)
        dtype = rng.choice(DTYPES)
        imgs = _images(N, C, H, W, dtype, rng.random() < 0.5).requires_grad_()
        ids_keep = torch.stack([torch.randperm(L)[:K] for _ in range(N)])
        if rng.random() < 0.3:
            ids_keep = ids_keep.int()
        got = pe.gather_patches(imgs, ids_keep, p)
        want = _expected_patches(imgs[:, :, :h * p, :w * p], ids_keep.long(), p)
        assert torch.equal(got, want), f"case {case}: p={p} C={C} {H}x{W} N={N} K={K} {dtype}"
        grad = torch.randn_like(want)
        (g_got,) = torch.autograd.grad(got, imgs, grad)
        (g_want,) = torch.autograd.grad(want, imgs, grad)
        assert torch.equal(g_got, g_want), f"backward case {case}"


@pytest.mark.slow  # many random cases: the main lane only (`make test-compat` deselects it)
def test_add_pos_cls_fuzz_matches_torch():
    rng = random.Random(99)
    for case in range(200):
        N, L, D = rng.randint(1, 3), rng.randint(1, 6), rng.choice([1, 3, 8, 17, 33])
        K = rng.randint(0, L)
        dtype = rng.choice(DTYPES)
        x = torch.randn(N, K, D).to(dtype)
        pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D).to(dtype)
        ids_keep = torch.stack([torch.randperm(L)[:K] for _ in range(N)])
        got = pe.add_pos_cls(x, pos_embed, cls_token, ids_keep)
        # the oracle's order: + pos on every patch, gather, cat the cls row
        want = torch.cat([(cls_token + pos_embed[:, :1]).expand(N, -1, -1),
                          torch.stack([(x[n] + pos_embed[0, 1 + ids_keep[n]]) for n in range(N)])
                          if K else x + pos_embed[:, :0]], 1)
        assert torch.equal(got, want), f"case {case}"


def test_channels_last_and_sliced_inputs(device):
    """Any strides: a channels_last image and a strided view give the contiguous result."""
    p, N, C = 4, 2, 3
    base = torch.randn(N, C, 8, 16)
    view = base[:, :, :, ::2]  # (N, C, 8, 8), W stride 2
    ids_keep = _kept(N, 4, 0.5)
    assert torch.equal(pe.gather_patches(view, ids_keep, p),
                       pe.gather_patches(view.contiguous(), ids_keep, p))


def test_opcheck(device):
    p, N, C, H, W, D = 4, 2, 3, 8, 12, 8
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, requires_grad=True)
    ids_keep = _kept(N, L, 0.5)
    torch.library.opcheck(pe.gather_patches, (imgs, ids_keep, p))
    torch.library.opcheck(pe.scatter_patches,
                          (torch.randn(N, ids_keep.shape[1], C * p * p), ids_keep, p, H, W, True))
    x = torch.randn(N, ids_keep.shape[1], D, requires_grad=True)
    torch.library.opcheck(pe.add_pos_cls, (x, torch.randn(1, 1 + L, D, requires_grad=True),
                                           torch.randn(1, 1, D, requires_grad=True), ids_keep))


def test_meta_tensors_flow():
    imgs = torch.empty(2, 3, 32, 48, device="meta")
    ids_keep = torch.empty(2, 6, dtype=torch.long, device="meta")
    patches = torch.ops.mae_fast.gather_patches(imgs, ids_keep, 8)
    assert patches.shape == (2, 6, 192) and patches.device.type == "meta"
    x = torch.empty(2, 6, 16, device="meta", dtype=torch.bfloat16)
    tokens = torch.ops.mae_fast.add_pos_cls(x, torch.empty(1, 25, 16, device="meta"),
                                            torch.empty(1, 1, 16, device="meta"), ids_keep)
    assert tokens.shape == (2, 7, 16) and tokens.dtype == torch.float32


def test_torch_compile_fullgraph(device):
    p, N, C, H, W, D = 4, 2, 3, 8, 8, 8
    L = (H // p) * (W // p)
    weight, bias = torch.randn(D, C, p, p, requires_grad=True), torch.randn(D, requires_grad=True)
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.5)

    def encoder_input(imgs, ids_keep):
        return ops.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep,
                                      backend="fast")

    compiled = torch.compile(encoder_input, fullgraph=True, backend="aot_eager")
    got = compiled(imgs, ids_keep)
    want = reference.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert weight.grad is not None and cls_token.grad is not None


def test_torch_fallback_of_the_ops_without_triton(monkeypatch, device):
    """Off-Triton devices run a torch version of the same gather; it agrees bit for bit."""
    p, N, C, H, W, D = 4, 2, 3, 8, 12, 8
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, requires_grad=True)
    ids_keep = _kept(N, L, 0.5)
    x, pos_embed, cls_token = torch.randn(N, ids_keep.shape[1], D), torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    grad = torch.randn(N, ids_keep.shape[1], C * p * p)
    triton_out = (pe.gather_patches(imgs, ids_keep, p), pe.add_pos_cls(x, pos_embed, cls_token, ids_keep),
                  pe.scatter_patches(grad, ids_keep, p, H, W, False))
    monkeypatch.setattr(pe, "_triton_runs", lambda device: False)
    torch_out = (pe.gather_patches(imgs, ids_keep, p), pe.add_pos_cls(x, pos_embed, cls_token, ids_keep),
                 pe.scatter_patches(grad, ids_keep, p, H, W, False))
    for a, b in zip(triton_out, torch_out):
        assert torch.equal(a, b)


def _embed_args(N=2, C=3, H=8, W=8, p=4, D=8):
    L = (H // p) * (W // p)
    return [torch.randn(N, C, H, W), torch.randn(D, C, p, p), torch.randn(D),
            torch.randn(1, 1 + L, D), torch.randn(1, 1, D), _kept(N, L, 0.5)]


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: a.__setitem__(5, a[5].float()), TypeError, "ids_keep must be int64 or int32"),
    (lambda a: a.__setitem__(5, a[5] + 100), ValueError, r"ids_keep values must lie in \[0, 4\)"),
    (lambda a: a.__setitem__(5, a[5] - 100), ValueError, r"ids_keep values must lie"),
    (lambda a: a.__setitem__(5, a[5][:1]), ValueError, r"ids_keep must be \(2, K\)"),
    (lambda a: a.__setitem__(0, a[0].double()), TypeError, "supports imgs, weight, pos_embed"),
    # fp32 image with a float64 table: the kernels would round the table to fp32 silently
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, "supports imgs, weight, pos_embed"),
    (lambda a: a.__setitem__(4, a[4].double()), TypeError, "supports imgs, weight, pos_embed"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"imgs must be \(N, C, H, W\)"),
    (lambda a: a.__setitem__(1, a[1][:, :2]), ValueError, r"weight must be \(D, 3, p, p\)"),
    (lambda a: a.__setitem__(3, a[3][:, :3]), ValueError, r"pos_embed must be \(1, 5, 8\)"),
    (lambda a: a.__setitem__(4, a[4][..., :3]), ValueError, r"cls_token must be"),
    (lambda a: a.__setitem__(2, a[2][:3]), ValueError, r"bias must be"),
    (lambda a: a.__setitem__(5, a[5].to("meta")), ValueError, "all inputs must be on one device"),
])
def test_bad_input_gives_a_clear_error(change, exc, match):
    args = _embed_args()
    change(args)
    with pytest.raises(exc, match=match):
        ops.patch_embed_masked(*args, backend="fast")


def test_duplicate_ids_are_refused_in_the_scatter():
    """The backward writes each kept patch once; duplicates would need a sum, so they raise."""
    ids_keep = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="distinct"):
        pe.scatter_patches(torch.randn(1, 2, 48), ids_keep, 4, 8, 8, False)


@pytest.mark.parametrize("patch_size, norm_pix_loss, embed_mode", [(4, True, "split"), (8, False, "split"),
                                                                    (8, True, "gemm")])
def test_whole_model_fast_equals_reference(patch_size, norm_pix_loss, embed_mode, monkeypatch, device):
    """A tiny MAE (img 32, embed 64, depth 1), fp32: backend="fast" (Triton encoder input and
    loss, interpreted) against backend="reference": loss, pred, mask and every gradient.
    embed_mode "gemm" runs the encoder input as the one-kernel GEMM (MAE_FAST_PATCH_EMBED)."""
    from mae_fast.model import MaskedAutoencoderViT
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", embed_mode)
    try:
        choose("unshuffle", device, "fast")
    except RuntimeError:  # the decoder-input op is another issue's; keep it on the reference here
        real_unshuffle = ops.unshuffle
        monkeypatch.setattr(ops, "unshuffle", lambda *a, backend="auto", **k:
                            real_unshuffle(*a, backend="reference", **k))
    config = dict(img_size=32, patch_size=patch_size, in_chans=3, embed_dim=64, depth=1,
                  num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                  mlp_ratio=2.0, norm_pix_loss=norm_pix_loss)
    reference_model = MaskedAutoencoderViT(**config, backend="reference")
    fast_model = MaskedAutoencoderViT(**config, backend="fast", attn_backend="math")
    fast_model.load_state_dict(reference_model.state_dict())
    for op in ("patch_embed_masked", "masked_loss"):
        assert choose(op, device, fast_model.backend).impl == "triton"
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, (32 // patch_size) ** 2)
    want = reference_model(imgs, mask_ratio=0.75, noise=noise)
    got = fast_model(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    want[0].backward()
    got[0].backward()
    for (name, p_ref), p_fast in zip(reference_model.named_parameters(), fast_model.parameters()):
        if p_ref.grad is None:
            assert p_fast.grad is None, name
            continue
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


# ---- stretch: the one-kernel GEMM (gather prologue, pos/cls epilogue) ----------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p, C, hw, N, ratio", CASES[::2] + [(4, 3, (12, 8), 3, 0.5)])
def test_gemm_kernel_matches_reference(p, C, hw, N, ratio, dtype, device):
    """fp32: within 1e-5 of the reference (IEEE fp32 products). fp16/bf16: its error against
    the fp32 reference is at most 2x the reference's own error in that dtype (+ a floor)."""
    L, D = (hw[0] // p) * (hw[1] // p), 40
    imgs = _images(N, C, *hw, dtype, channels_last=(N == 3)).requires_grad_()
    weight = (torch.randn(D, C, p, p) * 0.05).to(dtype).requires_grad_()
    bias = torch.randn(D).to(dtype).requires_grad_()
    pos_embed, cls_token = torch.randn(1, 1 + L, D).requires_grad_(), torch.randn(1, 1, D).requires_grad_()
    ids_keep = _kept(N, L, ratio)
    inputs = [imgs, weight, bias, pos_embed, cls_token]
    got = pe.patch_embed_gemm(*inputs, ids_keep, dtype)
    want = reference.patch_embed_masked(*inputs, ids_keep)
    assert got.dtype == want.dtype and got.shape == want.shape
    grad_out = torch.randn_like(want)
    results = [(got, *torch.autograd.grad(got, inputs, grad_out)),
               (want, *torch.autograd.grad(want, inputs, grad_out))]
    names = ("tokens", "imgs", "weight", "bias", "pos_embed", "cls_token")
    if dtype == torch.float32:
        for name, g, w in zip(names, *results):
            torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        return
    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact_out = reference.patch_embed_masked(*exact_inputs, ids_keep)
    exact = (exact_out, *torch.autograd.grad(exact_out, exact_inputs, grad_out))
    for name, g, w, e in zip(names, *results, exact):
        err_fast, err_torch = (g.float() - e).abs().max().item(), (w.float() - e).abs().max().item()
        floor = 2.0 ** -7 * max(1.0, e.abs().max().item())  # one bf16 ulp (interpreter truncates)
        assert err_fast <= 2 * err_torch + floor, f"{name}: {err_fast} > 2 * {err_torch} + {floor}"


def test_gemm_opcheck_and_torch_fallback(monkeypatch, device):
    p, N, C, H, W, D = 4, 2, 3, 8, 12, 16
    L = (H // p) * (W // p)
    args = (torch.randn(N, C, H, W, requires_grad=True), torch.randn(D, C, p, p, requires_grad=True),
            torch.randn(D, requires_grad=True), torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True),
            _kept(N, L, 0.5), torch.float32)
    torch.library.opcheck(pe.patch_embed_gemm, args)
    no_bias = args[:2] + (None,) + args[3:]
    torch.library.opcheck(pe.patch_embed_gemm, no_bias)
    triton_out = pe.patch_embed_gemm(*args)
    monkeypatch.setattr(pe, "_triton_runs", lambda device: False)
    torch.testing.assert_close(pe.patch_embed_gemm(*args), triton_out, atol=1e-5, rtol=1e-5)


def test_gemm_mode_is_picked_by_env_and_compiles(monkeypatch, device):
    p, N, C, H, W, D = 4, 2, 3, 8, 8, 16
    L = (H // p) * (W // p)
    weight, bias = torch.randn(D, C, p, p, requires_grad=True), torch.randn(D, requires_grad=True)
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)
    imgs, ids_keep = torch.randn(N, C, H, W), _kept(N, L, 0.5)
    calls = []
    real = pe.patch_embed_gemm
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", "gemm")
    monkeypatch.setattr(pe, "patch_embed_gemm", lambda *a: calls.append(1) or real(*a))
    ops.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, backend="fast")
    assert calls
    monkeypatch.setattr(pe, "patch_embed_gemm", real)
    compiled = torch.compile(lambda i, k: ops.patch_embed_masked(i, weight, bias, pos_embed, cls_token, k,
                                                                 backend="fast"),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(imgs, ids_keep),
                               reference.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep))
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", "fused-typo")
    with pytest.raises(ValueError, match="MAE_FAST_PATCH_EMBED"):
        ops.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, backend="fast")


@pytest.mark.parametrize("embed_mode", ["split", "gemm"])
def test_autocast_bf16_matches_reference_under_autocast(embed_mode, monkeypatch, device):
    """Under autocast the reference's conv runs in bf16 and + pos (fp32) gives fp32 tokens;
    both fast modes give the same dtype and agree to bf16 accuracy."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", embed_mode)
    p, N, C, H, W, D = 8, 2, 3, 16, 24, 32
    L = (H // p) * (W // p)
    args = [torch.randn(N, C, H, W), torch.randn(D, C, p, p) * 0.05, torch.randn(D),
            torch.randn(1, 1 + L, D), torch.randn(1, 1, D), _kept(N, L, 0.75)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = ops.patch_embed_masked(*args, backend="fast")
        want = reference.patch_embed_masked(*args)
    exact = reference.patch_embed_masked(*args)  # fp32
    assert got.dtype == want.dtype == torch.float32
    err_fast, err_torch = (got - exact).abs().max().item(), (want - exact).abs().max().item()
    assert err_fast <= 2 * err_torch + 2.0 ** -7 * exact.abs().max().item(), (err_fast, err_torch)
