"""Drift over several optimizer steps, backend="fast" against backend="reference": a single step's
parity does not show an error that compounds (an update that is slightly off moves the weights the
next step starts from). A tiny MAE (odd 2x3 grid, norm_pix_loss), the official AdamW settings, a
few steps on fresh images and masks; both lanes (Triton interpreted on CPU, compiled on CUDA).
Small patches keep the interpreter fast; patch 14 runs in the kernel tests and test_cuda_model.

fp32 (both lanes): every step's loss and the final weights agree to fp32 rounding. bf16 / fp16
autocast (CUDA lane): each step's loss is compared with an fp32 reference run from the same start
(flash-attention's rule: the fast path's error at most 2x the reference's own error in that dtype,
plus one ulp of the loss)."""
import copy

import pytest
import torch

from mae_fast.model import MaskedAutoencoderViT

CONFIG = dict(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
              decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0,
              norm_pix_loss=True)
N, STEPS, MASK_RATIO = 2, 3, 0.5
L = (8 // 4) * (12 // 4)


def _batches(device):
    """STEPS (imgs, noise) pairs drawn on CPU (same numbers on every device)."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(N, 3, 8, 12, generator=g).to(device), torch.rand(N, L, generator=g).to(device))
            for _ in range(STEPS)]


def _train(model, batches, autocast_dtype=None):
    """Losses of STEPS AdamW steps (the official recipe's betas and weight decay)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    device_type = batches[0][0].device.type
    losses = []
    for imgs, noise in batches:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=MASK_RATIO, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return torch.stack(losses)  # (STEPS,)


def _models(device):
    torch.manual_seed(0)
    reference_model = MaskedAutoencoderViT(**CONFIG, backend="reference").to(device)
    with torch.no_grad():  # a trained-looking mask token (it starts as a small random vector)
        reference_model.mask_token.normal_(std=0.5)
    fast_model = MaskedAutoencoderViT(**CONFIG, backend="fast").to(device)
    fast_model.load_state_dict(reference_model.state_dict())
    return reference_model, fast_model


def test_fp32_loss_trajectory_and_weights_match(device):
    reference_model, fast_model = _models(device)
    batches = _batches(device)
    want = _train(reference_model, batches)
    got = _train(fast_model, batches)
    assert torch.all(want[1:] != want[0]), "the steps must change the loss"
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)  # seen here: <= 1e-7 relative
    for (name, p_ref), p_fast in zip(reference_model.named_parameters(), fast_model.parameters()):
        if name.endswith("attn.qkv.bias"):
            # the key bias's true gradient is 0 (softmax ignores a per-query constant), so its
            # gradient is rounding noise that Adam normalises into steps of +-lr: compare q and v only
            D = p_ref.shape[0] // 3
            p_ref, p_fast = torch.cat([p_ref[:D], p_ref[2 * D:]]), torch.cat([p_fast[:D], p_fast[2 * D:]])
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# CUDA only: on CPU the interpreted loss kernel makes three more trajectories cost ~30 s
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_autocast_trajectory_within_twice_the_reference_error(device, dtype):
    reference_model, fast_model = _models(device)
    exact_model = copy.deepcopy(reference_model)
    batches = _batches(device)
    exact = _train(exact_model, batches)  # fp32 reference
    want = _train(reference_model, batches, dtype)
    got = _train(fast_model, batches, dtype)
    err_fast, err_torch = (got - exact).abs(), (want - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert torch.all(err_fast <= 2 * err_torch + ulp), (
        f"per-step |fast - fp32| {err_fast.tolist()} vs 2 x |reference - fp32| {err_torch.tolist()}")
