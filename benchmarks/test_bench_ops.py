"""Per op, fast vs reference, forward / backward / both, grouped per (op, pass, device).

Shapes are a ViT-B/16 MAE step at 224 px, mask ratio 0.75 (L=196, K=49, D=768, decoder 512,
12 heads encoder), batch ``--bench-op-batch``. ``fast`` is ``backend="fast"``: where the fused
kernel cannot run on a device (Triton on CPU) the case skips with the dispatcher's reason.
Backward is timed alone (``torch.autograd.grad`` on a fresh forward made outside the timer).
"""
import pytest
import torch

from mae_contenders import sync
from mae_fast import ops, reference
from mae_fast.attention import attend
from mae_fast.backends import choose

P, IMG, D, DD, HEADS, RATIO = 16, 224, 768, 512, 12, 0.75
L = (IMG // P) ** 2
K = reference.num_keep(L, RATIO)
PASSES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("reference", "fast")
OP_NAMES = {  # benchmark op -> dispatcher op
    "encoder input": "patch_embed_masked",
    "decoder input": "unshuffle",
    "masked loss": "masked_loss",
    "attention": "attention",
}


def _masking(N, device):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(N, L, generator=g).to(device)
    return reference.masking_indices(noise, K)  # ids_keep, ids_restore, mask


def _randn(*shape, device, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def make_case(op, backend, N, device, dtype=torch.float32):
    """-> (forward() -> output, inputs that want grads, grad of the output)."""
    ids_keep, ids_restore, mask = _masking(N, device)
    if op == "encoder input":
        imgs = _randn(N, 3, IMG, IMG, device=device, dtype=dtype)
        weight = _randn(D, 3, P, P, device=device, requires_grad=True, seed=1, dtype=dtype)
        bias = _randn(D, device=device, requires_grad=True, seed=2, dtype=dtype)
        pos = _randn(1, 1 + L, D, device=device, seed=3, dtype=dtype)
        cls = _randn(1, 1, D, device=device, requires_grad=True, seed=4, dtype=dtype)
        fwd = lambda: ops.patch_embed_masked(imgs, weight, bias, pos, cls, ids_keep, backend=backend)  # noqa: E731
        wants, out_shape = (weight, bias, cls), (N, 1 + K, D)
    elif op == "decoder input":
        x = _randn(N, 1 + K, DD, device=device, requires_grad=True, dtype=dtype)
        mask_token = _randn(1, 1, DD, device=device, requires_grad=True, seed=1, dtype=dtype)
        pos = _randn(1, 1 + L, DD, device=device, seed=2, dtype=dtype)
        fwd = lambda: ops.unshuffle(x, mask_token, ids_restore, pos, backend=backend)  # noqa: E731
        wants, out_shape = (x, mask_token), (N, 1 + L, DD)
    elif op == "masked loss":
        imgs = _randn(N, 3, IMG, IMG, device=device, dtype=dtype)
        pred = _randn(N, L, P * P * 3, device=device, requires_grad=True, seed=1, dtype=dtype)
        fwd = lambda: ops.masked_loss(imgs, pred, mask, P, False, backend=backend)  # noqa: E731
        wants, out_shape = (pred,), ()
    elif op == "attention":
        qkv = _randn(N, 1 + K, 3 * D, device=device, requires_grad=True, dtype=dtype)
        attn_backend = "math" if backend == "reference" else "auto"
        fwd = lambda: attend(qkv, HEADS, (D // HEADS) ** -0.5, backend=attn_backend)  # noqa: E731
        wants, out_shape = (qkv,), (N, 1 + K, D)
    else:
        raise ValueError(op)
    if out_shape:
        grad = _randn(*out_shape, device=device, dtype=dtype, seed=9)
    else:  # the loss: a scalar in the loss's dtype
        grad = torch.ones((), device=device, dtype=fwd().dtype)
    return fwd, wants, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("op", list(OP_NAMES))
def test_op(benchmark, request, op, pass_, backend, device, dtype):
    N = request.config.getoption("--bench-op-batch")
    if op != "attention":
        try:
            choice = choose(OP_NAMES[op], device, backend)
        except RuntimeError as e:
            pytest.skip(str(e))
    else:
        choice = choose("attention", device, "math" if backend == "reference" else "auto")
    benchmark.group = f"{op}, {pass_}, {device.type}, {str(dtype).replace('torch.', '')}, batch {N}"
    benchmark.extra_info["impl"] = choice.impl
    benchmark.name = f"{op} {pass_} {backend} ({choice.impl})"
    fwd, wants, grad = make_case(op, backend, N, device, dtype)

    if pass_ == "fwd":
        def run():
            out = fwd()
            sync(device)
            return out
        benchmark(run)
    elif pass_ == "fwd+bwd":
        def run():
            grads = torch.autograd.grad(fwd(), wants, grad)
            sync(device)
            return grads
        benchmark(run)
    else:
        def setup():
            out = fwd()
            sync(device)
            return (out,), {}

        def run(out):
            grads = torch.autograd.grad(out, wants, grad)
            sync(device)
            return grads
        benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=2, iterations=1)
