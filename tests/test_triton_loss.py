"""The Triton masked loss (forward + backward into pred and imgs) against the reference, run on
CPU by the Triton interpreter (TRITON_INTERPRET=1, set in conftest); the tests that take ``device``
also run compiled on CUDA tensors in the CUDA lane (tests/_lane.py)."""
import random

import pytest
import torch

from mae_fast import ops, reference
from mae_fast.ops import loss as loss_mod
from mae_fast.ops import patch_embed as pe
from _lane import lane_device

pytestmark = pytest.mark.skipif(not pe._triton_runs(lane_device()),
                                reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(N, C, H, W, p, ratio, dtype, channels_last=False):
    L, P = (H // p) * (W // p), C * p * p
    imgs = torch.randn(N, C, H, W).to(dtype)
    if channels_last:
        imgs = imgs.to(memory_format=torch.channels_last)
    pred = torch.randn(N, L, P).to(dtype)
    mask = reference.masking_indices(torch.rand(N, L), reference.num_keep(L, ratio))[2]
    return imgs.requires_grad_(), pred.requires_grad_(), mask


def _loss_and_grads(fn, imgs, pred, mask, p, norm_pix):
    loss = fn(imgs, pred, mask, p, norm_pix)
    return (loss, *torch.autograd.grad(loss, [imgs, pred]))


def _fast(imgs, pred, mask, p, norm_pix):
    return ops.masked_loss(imgs, pred, mask, p, norm_pix, backend="fast")


def _assert_matches_reference(imgs, pred, mask, p, norm_pix):
    """fp32: within 1e-5 of the reference. fp16/bf16: the fast path's error against the fp32
    reference is at most 2x PyTorch's own error in that dtype (the flash-attention rule),
    plus a small absolute floor. bf16 adds one bf16 ulp: the Triton 3.8 interpreter rounds
    fp32 -> bf16 toward zero (``interpreter.cast_impl``), where the GPU rounds to nearest."""
    got = _loss_and_grads(_fast, imgs, pred, mask, p, norm_pix)
    want = _loss_and_grads(reference.masked_loss, imgs, pred, mask, p, norm_pix)
    assert got[0].dtype == want[0].dtype and got[2].dtype == pred.dtype and got[1].dtype == imgs.dtype
    names = ("loss", "grad_imgs", "grad_pred")
    if imgs.dtype == torch.float32:
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        return
    i32 = imgs.detach().float().requires_grad_()
    p32 = pred.detach().float().requires_grad_()
    exact = _loss_and_grads(reference.masked_loss, i32, p32, mask, p, norm_pix)
    for name, g, w, e in zip(names, got, want, exact):
        err_fast = (g.float() - e).abs().max().item()
        err_torch = (w.float() - e).abs().max().item()
        floor = 1e-3 * max(1.0, e.abs().max().item())
        if g.dtype == torch.bfloat16:
            floor += 2.0 ** -7 * e.abs().max().item()
        assert err_fast <= 2 * err_torch + floor, f"{name}: {err_fast} > 2 * {err_torch} + {floor}"
    # kept patches get no gradient at all
    assert torch.all(got[2][mask == 0] == 0)


CASES = [  # patch, in_chans, (H, W), batch, mask ratio
    (4, 3, (8, 8), 1, 0.75),
    (4, 1, (12, 8), 3, 0.5),
    (8, 4, (16, 24), 3, 0.75),
    (8, 3, (16, 16), 1, 0.9),
    (14, 3, (28, 14), 1, 0.5),
    (14, 1, (28, 28), 3, 0.75),
    (16, 3, (32, 32), 1, 0.75),
    (16, 4, (16, 32), 3, 0.9),
]


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p, C, hw, N, ratio", CASES)
def test_loss_and_grads_match_reference(p, C, hw, N, ratio, dtype, norm_pix, device):
    imgs, pred, mask = _case(N, C, *hw, p, ratio, dtype, channels_last=(N == 3))
    _assert_matches_reference(imgs, pred, mask, p, norm_pix)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_mask_ratio_zero_is_nan_like_the_reference(norm_pix, device):
    """Nothing removed: sum(mask) = 0, the official loss is 0/0 = nan; so is ours."""
    imgs, pred, mask = _case(2, 3, 8, 8, 4, 0.0, torch.float32)
    assert mask.sum() == 0
    assert torch.isnan(reference.masked_loss(imgs, pred, mask, 4, norm_pix))
    assert torch.isnan(_fast(imgs, pred, mask, 4, norm_pix))


@pytest.mark.slow  # many random cases: the main lane only (`make test-compat` deselects it)
def test_fuzz_against_reference():
    """200 seeded random cases: patch, channels, grid, batch, ratio, dtype, layout, norm_pix,
    non-binary mask weights, a strided pred; loss, grad_pred and grad_imgs."""
    rng = random.Random(4321)
    for case in range(200):
        p = rng.choice([1, 2, 3, 4, 5])
        C = rng.randint(1, 4)
        if p * p * C == 1:
            C = 2  # norm_pix_loss's unbiased variance needs two pixels per patch
        h, w, N = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        dtype = rng.choice(DTYPES)
        imgs, pred, mask = _case(N, C, h * p, w * p, p, rng.choice([0.25, 0.5, 0.75, 0.9]),
                                 dtype, channels_last=rng.random() < 0.5)
        if mask.sum() == 0:
            mask[0, 0] = 1.0
        if rng.random() < 0.2:
            mask = mask * torch.rand_like(mask)  # the op is a weighted mean, like the reference
        if rng.random() < 0.2:  # a strided view of a bigger prediction
            pred = torch.randn(N, h * w, 2 * p * p * C).to(dtype)[:, :, ::2].requires_grad_()
        try:
            _assert_matches_reference(imgs, pred, mask, p, rng.random() < 0.5)
        except AssertionError as e:
            raise AssertionError(f"case {case}: p={p} C={C} grid={h}x{w} N={N} {dtype}: {e}") from e


def test_pred_grad_only_when_imgs_do_not_require_grad(device):
    imgs, pred, mask = _case(2, 3, 8, 12, 4, 0.75, torch.float32)
    imgs = imgs.detach()
    (got,) = torch.autograd.grad(_fast(imgs, pred, mask, 4, True), pred)
    (want,) = torch.autograd.grad(reference.masked_loss(imgs, pred, mask, 4, True), pred)
    torch.testing.assert_close(got, want)


def test_loss_is_deterministic(device):
    imgs, pred, mask = _case(3, 3, 16, 16, 4, 0.75, torch.float32)
    first = _fast(imgs, pred, mask, 4, True)
    assert all(torch.equal(first, _fast(imgs, pred, mask, 4, True)) for _ in range(3))


def test_mask_requiring_grad_falls_back_to_the_reference(device):
    imgs, pred, mask = _case(1, 3, 8, 8, 4, 0.5, torch.float32)
    mask = mask.clone().requires_grad_()
    (got,) = torch.autograd.grad(_fast(imgs, pred, mask, 4, False), mask)
    (want,) = torch.autograd.grad(reference.masked_loss(imgs, pred, mask, 4, False), mask)
    torch.testing.assert_close(got, want)


def test_opcheck(device):
    imgs, pred, mask = _case(2, 3, 8, 12, 4, 0.75, torch.float32)
    for norm_pix in (False, True):
        torch.library.opcheck(loss_mod.masked_loss_op, (imgs, pred, mask, 4, norm_pix))
    loss, mask_sum = loss_mod.masked_loss_op(imgs, pred, mask, 4, True)
    torch.library.opcheck(loss_mod.masked_loss_backward,
                          (torch.ones(()), imgs.detach(), pred.detach(), mask, mask_sum, 4, True, True))


def test_meta_tensors_flow():
    imgs = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16)
    pred = torch.empty(2, 16, 192, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(2, 16, device="meta")
    loss, mask_sum = torch.ops.mae_fast.masked_loss(imgs, pred, mask, 8, True)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "meta"


def test_torch_compile_fullgraph(device):
    imgs, pred, mask = _case(2, 3, 8, 8, 4, 0.75, torch.float32)

    def loss_fn(imgs, pred, mask):
        return ops.masked_loss(imgs, pred, mask, 4, True, backend="fast")

    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(imgs, pred, mask)
    want = reference.masked_loss(imgs, pred, mask, 4, True)
    torch.testing.assert_close(got, want)
    got.backward()
    assert pred.grad is not None and imgs.grad is not None


def _loss_args():
    return list(_case(2, 3, 8, 8, 4, 0.75, torch.float32)) + [4]


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: a.__setitem__(0, a[0].double()), TypeError, "supports imgs, pred and mask"),
    (lambda a: a.__setitem__(1, a[1].half()), None, None),  # mixed low precision pred is fine
    (lambda a: a.__setitem__(2, a[2].bool()), TypeError, "supports imgs, pred and mask"),
    (lambda a: a.__setitem__(1, a[1][:, :3]), ValueError, r"pred must be \(2, 4, 48\)"),
    (lambda a: a.__setitem__(2, a[2][:1]), ValueError, r"mask must be \(2, 4\)"),
    (lambda a: a.__setitem__(3, 3), ValueError, "not a whole number of 3x3 patches"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"imgs must be \(N, C, H, W\)"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "all inputs must be on one device"),
])
def test_bad_input_gives_a_clear_error(change, exc, match):
    args = _loss_args()
    change(args)
    imgs, pred, mask, p = args
    if exc is None:
        torch.testing.assert_close(_fast(imgs, pred, mask, p, False),
                                   reference.masked_loss(imgs, pred, mask, p, False), atol=1e-3, rtol=1e-3)
        return
    with pytest.raises(exc, match=match):
        _fast(imgs, pred, mask, p, False)


def test_op_refuses_a_device_without_triton(monkeypatch):
    imgs, pred, mask = _case(1, 3, 8, 8, 4, 0.5, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        loss_mod.masked_loss_op(imgs, pred, mask, 4, False)


@pytest.mark.parametrize("make_view", [
    lambda x: x[:, :, :, ::2],  # W stride 2: the channel-major tile
    lambda x: x.to(memory_format=torch.channels_last)[:, :, 4:12, :8],  # channels_last slice: pixel-major
    lambda x: x[:, :1, :8, 4:12],  # one channel, unit W stride, not dense: pixel-major
], ids=["w-stride-2", "nhwc-slice", "c1-slice"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_strided_image_views(make_view, norm_pix, device):
    base = torch.randn(2, 3, 16, 16)
    imgs = make_view(base).detach().requires_grad_()
    N, C, H, W = imgs.shape
    pred = torch.randn(N, (H // 4) * (W // 4), C * 16, requires_grad=True)
    mask = reference.masking_indices(torch.rand(N, pred.shape[1]), 1)[2]
    _assert_matches_reference(imgs, pred, mask, 4, norm_pix)
