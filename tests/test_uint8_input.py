"""uint8 images in, normalisation fused into the image reads (issue 15 item 2).

A uint8 image (N, C, H, W) with mean/std set stands for the float image
``(x / 255 - mean[c]) / std[c]`` that ``mae_fast.data.to_normalized_tensor`` makes (fp32, then
the model's dtype). Everything here checks "uint8-in equals float-in": the normalising gather and
the loss's normalising target load against the float ops on that float image (bit-identical: the
same fp32 ops in the same order), the whole model (loss, pred, every parameter gradient) fast vs
fast and fast vs the reference, and the error cases. Triton runs in the interpreter on CPU; the
tests that take ``device`` also run compiled in the CUDA lane."""
from functools import partial

import pytest
import torch
import torch.nn as nn

from mae_fast import data, ops, reference
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops import loss as loss_mod
from mae_fast.ops import patch_embed as pe
from _lane import lane_device

pytestmark = pytest.mark.skipif(not pe._triton_runs(lane_device()),
                                reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")

MEAN, STD = data.IMAGENET_DEFAULT_MEAN, data.IMAGENET_DEFAULT_STD


def _uint8(N, C, H, W, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g)
    imgs[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # both ends of the range
    imgs = imgs.to(torch.get_default_device())
    return imgs.to(memory_format=torch.channels_last) if channels_last else imgs


def _pixel_norm(C=3, mean=MEAN, std=STD):
    return torch.tensor([list(mean[:C]), list(std[:C])], dtype=torch.float32)


def _data_pipeline(imgs_u8):
    """The float image the data pipeline makes of the same pixels, one image at a time on CPU."""
    return torch.stack([data.to_normalized_tensor(img) for img in imgs_u8.cpu()]).to(imgs_u8.device)


def _kept(N, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(N)]).to(torch.get_default_device())


def test_normalize_pixels_is_the_data_pipelines_math_bit_for_bit():
    imgs = _uint8(2, 3, 5, 7)
    got = reference.normalize_pixels(imgs, _pixel_norm())
    assert got.dtype == torch.float32
    assert torch.equal(got, _data_pipeline(imgs))
    # the cast happens once, after the fp32 math
    assert torch.equal(reference.normalize_pixels(imgs, _pixel_norm(), torch.bfloat16),
                       _data_pipeline(imgs).to(torch.bfloat16))


@pytest.mark.parametrize("dtype,channels_last,p", [(torch.float32, False, 4), (torch.bfloat16, True, 3)])
def test_gather_normalized_equals_gather_of_the_normalised_image(device, dtype, channels_last, p):
    """Bit-identical: the kernel's div_rn divisions are IEEE divisions like torch's ``/``."""
    N, C, H, W = 2, 3, 3 * p, 5 * p + 1  # a column past the last whole patch
    imgs = _uint8(N, C, H, W, channels_last=channels_last)
    norm = _pixel_norm()
    ids = _kept(N, 15, 6)
    got = pe.gather_patches_normalized(imgs, ids, p, norm, dtype)
    want = pe.gather_patches(reference.normalize_pixels(imgs, norm, dtype), ids, p)
    assert got.dtype == dtype and torch.equal(got, want)


def test_gather_normalized_torch_fallback_equals_the_kernel(monkeypatch):
    """Where Triton does not run (CPU without the interpreter) the op body's torch version."""
    imgs, norm, ids = _uint8(2, 3, 8, 12), _pixel_norm(), _kept(2, 6, 3)
    kernel = pe.gather_patches_normalized(imgs, ids, 4, norm, torch.float32)
    monkeypatch.setattr(pe, "_triton_runs", lambda device: False)
    assert torch.equal(pe.gather_patches_normalized(imgs, ids, 4, norm, torch.float32), kernel)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_loss_uint8_equals_float(device, norm_pix):
    """Forward loss and grad_pred: the uint8 op bit-equals the float op on the normalised image
    (both Triton); and matches the reference within fp32 rounding."""
    N, C, H, W, p = 2, 3, 8, 12, 4
    imgs = _uint8(N, C, H, W, channels_last=norm_pix)
    norm = _pixel_norm()
    floats = reference.normalize_pixels(imgs, norm)
    L = (H // p) * (W // p)
    pred = torch.randn(N, L, C * p * p, requires_grad=True)
    mask = reference.masking_indices(torch.rand(N, L), 2)[2]
    got = ops.masked_loss(imgs, pred, mask, p, norm_pix, backend="fast", pixel_norm=norm,
                          pixel_dtype=torch.float32)
    want = ops.masked_loss(floats, pred, mask, p, norm_pix, backend="fast")
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(v, pred)[0] for v in (got, want)))
    ref = ops.masked_loss(imgs, pred, mask, p, norm_pix, backend="reference", pixel_norm=norm,
                          pixel_dtype=torch.float32)
    torch.testing.assert_close(got, ref)


def test_opcheck_uint8_ops(device):
    N, C, H, W, p = 2, 3, 8, 12, 4
    imgs, norm = _uint8(N, C, H, W), _pixel_norm()
    torch.library.opcheck(pe.gather_patches_normalized, (imgs, _kept(N, 6, 3), p, norm, torch.bfloat16))
    pred = torch.randn(N, 6, C * p * p, requires_grad=True)
    mask = reference.masking_indices(torch.rand(N, 6), 2)[2]
    torch.library.opcheck(loss_mod.masked_loss_op, (imgs, pred, mask, p, True, norm, torch.float32))
    loss, mask_sum = loss_mod.masked_loss_op(imgs, pred, mask, p, True, norm, torch.float32)
    torch.library.opcheck(loss_mod.masked_loss_backward,
                          (torch.ones(()), imgs, pred.detach(), mask, mask_sum, p, True, False,
                           norm, torch.float32))


# ---- the model ---------------------------------------------------------------------------------

def _tiny(p, H, W, dtype=torch.float32, backend="fast", norm_pix=False, **kw):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=(H, W), patch_size=p, in_chans=3, embed_dim=16, depth=1,
                                 num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
                                 mlp_ratio=2., norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                 norm_pix_loss=norm_pix, backend=backend, **kw)
    return model.to(dtype)


def _run(model, imgs, noise, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    return loss, pred, {n: q.grad for n, q in model.named_parameters() if q.grad is not None}


def _same(a, b, exact=True):
    (la, pa, ga), (lb, pb, gb) = a, b
    assert ga.keys() == gb.keys() and "patch_embed.proj.weight" in ga
    check = (lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)) if exact else \
        (lambda x, y: torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-5))
    check(la, lb)
    check(pa, pb)
    for name in ga:
        check(ga[name], gb[name])


# patch 8 / 14 / 16 on non-square grids, fp32 and a bf16 model, norm_pix_loss on and off
@pytest.mark.parametrize("p,H,W,dtype,norm_pix", [
    (8, 16, 24, torch.float32, True),
    (14, 28, 42, torch.bfloat16, False),
    (16, 32, 48, torch.float32, False),
])
def test_model_uint8_in_equals_float_in(p, H, W, dtype, norm_pix):
    model = _tiny(p, H, W, dtype, norm_pix=norm_pix, input_mean=MEAN, input_std=STD)
    imgs = _uint8(2, 3, H, W)
    noise = torch.rand(2, (H // p) * (W // p))
    floats = _data_pipeline(imgs).to(dtype)  # what the float pipeline feeds this model
    got = _run(model, imgs, noise)
    _same(got, _run(model, floats, noise))  # fast vs fast: bit-identical
    ref = _tiny(p, H, W, dtype, backend="reference", norm_pix=norm_pix, input_mean=MEAN, input_std=STD)
    want = _run(ref, imgs, noise)
    _same(want, _run(ref, floats, noise))  # the reference normalises first: identical too
    if dtype == torch.float32:
        _same(got, want, exact=False)  # fast vs reference: fp32 rounding only


@pytest.mark.parametrize("norm_pix", [False, True])
def test_model_uint8_with_decoder_masking_equals_float_in(norm_pix):
    """uint8 images with decoder-side masking (its loss, masked_loss_rows, normalises the uint8
    image first): the same loss, pred and grads as the float image, fast and reference."""
    p, H, W = 8, 16, 24
    noise = torch.rand(2, (H // p) * (W // p))
    imgs = _uint8(2, 3, H, W)
    floats = _data_pipeline(imgs)
    for backend in ("fast", "reference"):
        model = _tiny(p, H, W, backend=backend, norm_pix=norm_pix, input_mean=MEAN, input_std=STD,
                      decoder_mask_ratio=0.5)
        _same(_run(model, imgs, noise), _run(model, floats, noise))


def test_model_uint8_under_autocast_equals_fp32_float_in():
    """An fp32 model under bf16 autocast: the uint8 image stands for the fp32 normalised image,
    cast to bf16 where autocast casts the float image (the patch-embed linear)."""
    model = _tiny(8, 16, 24, input_mean=MEAN, input_std=STD)
    imgs, noise = _uint8(2, 3, 16, 24), torch.rand(2, 6)
    _same(_run(model, imgs, noise, autocast=True), _run(model, _data_pipeline(imgs), noise, autocast=True))


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True)])
def test_model_uint8_in_equals_float_in_with_the_gemm_kernel(monkeypatch, dtype, autocast):
    """MAE_FAST_PATCH_EMBED=gemm: the one-kernel GEMM normalises the uint8 pixels in its prologue
    (forward and the weight-gradient kernel), bit-identical to the float image."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", "gemm")
    calls = []
    real = pe.patch_embed_gemm
    monkeypatch.setattr(pe, "patch_embed_gemm", lambda *a: calls.append(a[0].dtype) or real(*a))
    model = _tiny(8, 16, 24, dtype, input_mean=MEAN, input_std=STD)
    imgs, noise = _uint8(2, 3, 16, 24), torch.rand(2, 6)
    _same(_run(model, imgs, noise, autocast), _run(model, _data_pipeline(imgs).to(dtype), noise, autocast))
    assert calls == [torch.uint8, dtype]


def test_opcheck_uint8_gemm(device):
    N, C, H, W, p, D, K, L = 2, 3, 8, 12, 4, 16, 3, 6
    imgs, norm = _uint8(N, C, H, W), _pixel_norm()
    weight, bias = torch.randn(D, C, p, p, requires_grad=True), torch.randn(D, requires_grad=True)
    pos, cls = torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)
    torch.library.opcheck(pe.patch_embed_gemm, (imgs, weight, bias, pos, cls, _kept(N, L, K),
                                                torch.float32, norm, torch.float32))


def test_model_uint8_through_a_hooked_patch_embed():
    """A hooked patch_embed runs the official op order: it sees the normalised float image."""
    model = _tiny(8, 16, 24, input_mean=MEAN, input_std=STD)
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    imgs, noise = _uint8(2, 3, 16, 24), torch.rand(2, 6)
    got = _run(model, imgs, noise)
    _same(got, _run(model, _data_pipeline(imgs), noise))
    assert seen == [torch.float32, torch.float32]


def test_set_input_normalization_and_state_dict():
    model = _tiny(8, 16, 24)
    keys = set(model.state_dict())
    model.set_input_normalization(MEAN, STD)
    assert set(model.state_dict()) == keys  # checkpoints load unchanged
    assert not list(model.buffers())  # no buffer: nothing for DDP to broadcast every step
    assert torch.equal(model.pixel_norm, _pixel_norm())
    model.to("meta").to_empty(device="cpu")  # follows the device, values rebuilt exactly
    assert torch.equal(model.pixel_norm, _pixel_norm())
    model.to(torch.bfloat16)  # the statistics stay fp32, exactly
    assert model.pixel_norm.dtype == torch.float32 and torch.equal(model.pixel_norm, _pixel_norm())
    assert torch.equal(model.normalize_input(_uint8(1, 3, 16, 24)),
                       _data_pipeline(_uint8(1, 3, 16, 24)).to(torch.bfloat16))
    model.set_input_normalization(None, None)
    assert model.pixel_norm is None
    with pytest.raises(TypeError, match="set_input_normalization"):
        model(_uint8(1, 3, 16, 24))


def test_bad_inputs_raise_clear_errors():
    model = _tiny(8, 16, 24)
    with pytest.raises(TypeError, match="set_input_normalization"):
        model(_uint8(1, 3, 16, 24))  # uint8 without mean/std
    with pytest.raises(ValueError, match="3 values"):
        model.set_input_normalization((0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ValueError, match="> 0"):
        model.set_input_normalization(MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="sequences"):
        model.set_input_normalization(0.5, 0.2)
    with pytest.raises(ValueError, match="3 values"):
        MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                             decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
                             input_mean=(0.5,), input_std=(0.2,))
    model.set_input_normalization(MEAN, STD)
    with pytest.raises(TypeError, match="floating-point"):
        model(_uint8(1, 3, 16, 24).to(torch.int32))  # other integer dtypes: not images we read
    with pytest.raises(TypeError, match="uint8 images only"):
        ops.masked_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 4, 48), torch.ones(1, 4), 4, False,
                        pixel_norm=_pixel_norm(), pixel_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(2, 3\) float32"):
        ops.masked_loss(_uint8(1, 3, 8, 8), torch.rand(1, 4, 48), torch.ones(1, 4), 4, False,
                        pixel_norm=_pixel_norm().double(), pixel_dtype=torch.float32)
    with pytest.raises(TypeError, match="need pixel_norm"):
        ops.patch_embed_masked(_uint8(1, 3, 8, 8), torch.rand(16, 3, 4, 4), None,
                               torch.rand(1, 5, 16), torch.rand(1, 1, 16), _kept(1, 4, 2))
