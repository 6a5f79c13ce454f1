"""CUDA-only checks of the whole model and of the training step (the CUDA lane:
``MAE_FAST_TEST_DEVICE=cuda pytest tests``; they skip elsewhere with the reason):

  * backend="fast" (compiled Triton + the _C CUDA ops + SDPA) against backend="reference", fp32
    with TF32 off and bf16 autocast, patch 16 and 14, forward and every gradient;
  * two runs of each of mae_fast's own ops on the same input give the same bits (the ops reduce in
    a fixed order; SDPA / cuBLAS are not claimed);
  * torch.compile(fullgraph=True) with inductor;
  * the default path makes no host sync (``torch.cuda.set_sync_debug_mode("error")``), and a full
    training step (forward + backward + AdamW with capturable=True and a tensor lr) is captured in
    one CUDA graph and replayed with a changing lr, equal to the same steps run eagerly.
"""
import copy

import pytest
import torch

from mae_fast import ops, reference
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops import patch_embed as pe
from mae_fast.ops.masking import masking_indices

pytestmark = pytest.mark.cuda

SMALL = dict(in_chans=3, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
             decoder_num_heads=4, mlp_ratio=2.0)
SHAPES = {16: (32, 48), 14: (28, 42)}  # patch -> (H, W): 2x3 grid, odd L


def _pair(patch_size, norm_pix_loss=True):
    ref = MaskedAutoencoderViT(img_size=SHAPES[patch_size], patch_size=patch_size, **SMALL,
                               norm_pix_loss=norm_pix_loss, backend="reference")
    with torch.no_grad():
        ref.mask_token.normal_(std=0.5)
    fast = MaskedAutoencoderViT(img_size=SHAPES[patch_size], patch_size=patch_size, **SMALL,
                                norm_pix_loss=norm_pix_loss, backend="fast")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(model, imgs, noise, autocast_dtype=None):
    """loss, pred, mask and {name: grad} of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, pred, mask = model(imgs, mask_ratio=0.5, noise=noise)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), mask, grads


def _inputs(patch_size, N=4):
    H, W = SHAPES[patch_size]
    return torch.randn(N, 3, H, W), torch.rand(N, (H // patch_size) * (W // patch_size))


@pytest.mark.parametrize("embed_mode", ["split", "gemm"])
@pytest.mark.parametrize("patch_size", [16, 14])
def test_fast_equals_reference_fp32(patch_size, embed_mode, cuda_device, monkeypatch):
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", embed_mode)
    ref, fast = _pair(patch_size)
    assert {c.impl for op, c in fast.backend_choices().items() if op != "attention"} <= {"triton", "c++"}
    imgs, noise = _inputs(patch_size)
    want, got = _run(ref, imgs, noise), _run(fast, imgs, noise)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[3].keys() == want[3].keys()
    for name, g in want[3].items():
        torch.testing.assert_close(got[3][name], g, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("patch_size", [16, 14])
def test_fast_within_twice_the_reference_error_under_autocast(patch_size, dtype, cuda_device):
    """Loss, pred and every gradient: |fast - fp32 reference| <= 2 |reference - fp32 reference|
    + one ulp of the dtype (flash-attention's rule), elementwise maxima."""
    ref, fast = _pair(patch_size)
    exact_model = copy.deepcopy(ref)
    imgs, noise = _inputs(patch_size)
    exact = _run(exact_model, imgs, noise)
    want, got = _run(ref, imgs, noise, dtype), _run(fast, imgs, noise, dtype)
    assert torch.equal(got[2], exact[2])
    pairs = [("loss", got[0], want[0], exact[0]), ("pred", got[1], want[1], exact[1])]
    pairs += [(n, got[3][n], want[3][n], e) for n, e in exact[3].items()]
    for name, g, w, e in pairs:
        err_fast = (g.float() - e).abs().max().item()
        err_torch = (w.float() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
        assert err_fast <= 2 * err_torch + floor, f"{name}: {err_fast} > 2 * {err_torch} + {floor}"


# ---- determinism of mae_fast's own ops ------------------------------------------------------

def _own_ops_outputs(dtype, embed_mode, N=8, image=224):
    """Every output and input gradient of mae_fast's ops, by default at ViT-B/16 widths (N=8,
    L=196, K=49, D=768, decoder 512): gather + add_pos_cls or the GEMM (encoder input), unshuffle
    (decoder input), masked loss, random masking. Seeded: two calls see the same inputs."""
    torch.manual_seed(123)
    p, D, DD = 16, 768, 512
    L = (image // p) ** 2
    K = L // 4
    noise = torch.rand(N, L)
    ids_keep, ids_restore, mask = masking_indices(noise, K, backend="fast")
    imgs = torch.randn(N, 3, image, image).to(dtype)
    weight = (torch.randn(D, 3, p, p) * 0.02).to(dtype).requires_grad_()
    bias = torch.randn(D).to(dtype).requires_grad_()
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D).requires_grad_()
    if embed_mode == "gemm":
        tokens = pe.patch_embed_gemm(imgs, weight, bias, pos_embed, cls_token, ids_keep, dtype)
    else:
        tokens = ops.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, backend="fast")
    x = torch.randn(N, 1 + K, DD).to(dtype).requires_grad_()
    mask_token = torch.randn(1, 1, DD).to(dtype).requires_grad_()
    decoder_in = ops.unshuffle(x, mask_token, ids_restore, torch.randn(1, 1 + L, DD).to(dtype), backend="fast")
    pred = torch.randn(N, 1 + L, p * p * 3).to(dtype)[:, 1:, :].requires_grad_()  # as the model slices it
    loss = ops.masked_loss(imgs, pred, mask, p, True, backend="fast")
    wants = [weight, bias, cls_token, x, mask_token, pred]
    grads = torch.autograd.grad([tokens, decoder_in, loss],
                                wants, [torch.randn_like(tokens), torch.randn_like(decoder_in), None])
    return [ids_keep, ids_restore, mask, tokens, decoder_in, loss, *grads]


@pytest.mark.parametrize("embed_mode", ["split", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_own_ops_give_the_same_bits_twice(dtype, embed_mode, cuda_device):
    first, second = _own_ops_outputs(dtype, embed_mode), _own_ops_outputs(dtype, embed_mode)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs between two runs"


# ---- torch.compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_whole_model_compiles_fullgraph_with_inductor(backend, cuda_device):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=SHAPES[16], patch_size=16, **SMALL, backend=backend)
    imgs, noise = _inputs(16)
    loss, pred, mask, grads = _run(model, imgs, noise)
    compiled = torch.compile(model, fullgraph=True)
    c_loss, c_pred, c_mask, c_grads = _run(compiled, imgs, noise)
    assert torch.equal(c_mask, mask)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_pred, pred, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        c_name = name if name in c_grads else f"_orig_mod.{name}"
        torch.testing.assert_close(c_grads[c_name], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


# ---- no host sync; one CUDA graph per training step -------------------------------------------

def test_default_path_makes_no_host_sync(cuda_device):
    """backend="auto", noise drawn by the model, forward + backward, under
    ``torch.cuda.set_sync_debug_mode("error")``: any op that waits for the GPU (``.item()``,
    ``nonzero``, a blocking copy to the host) raises."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=SHAPES[16], patch_size=16, **SMALL)
    imgs = torch.randn(4, 3, *SHAPES[16])
    for _ in range(2):  # compile the kernels first: the JIT is not the path under test
        model(imgs)[0].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, pred, mask = model(imgs)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def _capturable_adamw(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05,
                             capturable=True)


def test_training_step_is_captured_in_one_cuda_graph(cuda_device):
    """Forward + backward + AdamW(capturable=True, lr a tensor) captured once and replayed: each
    replay equals the same step run eagerly on a twin model (same inputs, same lr schedule), so
    the lr schedule is not frozen into the graph and the default path does no host sync (a sync
    during capture raises)."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=SHAPES[16], patch_size=16, **SMALL)
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    lr, twin_lr = torch.tensor(0.0), torch.tensor(0.0)  # warm-up steps move no weight
    opt, twin_opt = _capturable_adamw(model, lr), _capturable_adamw(twin, twin_lr)
    static_imgs, static_noise = _inputs(16)

    def step(m, o):
        loss, _, _ = m(static_imgs, mask_ratio=0.5, noise=static_noise)
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's docs ask
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(model, opt)
            twin_opt.zero_grad(set_to_none=True)
            step(twin, twin_opt)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step(model, opt)

    schedule = [1e-3, 5e-4, 2e-3, 1e-4]
    batches = [_inputs(16) for _ in schedule]
    for k, (value, (imgs, noise)) in enumerate(zip(schedule, batches)):
        lr.fill_(value)
        twin_lr.fill_(value)
        static_imgs.copy_(imgs)
        static_noise.copy_(noise)
        graph.replay()
        twin_opt.zero_grad(set_to_none=True)
        eager_loss = step(twin, twin_opt)
        torch.testing.assert_close(static_loss, eager_loss.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {k}: {m}")
    for (name, p_graph), p_eager in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start)), "no step moved a weight"
