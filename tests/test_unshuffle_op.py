"""The C++ unshuffle-scatter op (``torch.ops.mae_fast.unshuffle_scatter``, csrc/) against the
official decoder-input sequence (``mae_fast.reference.unshuffle``): forward bit-exact in every
dtype, gradients (grad_x exact, grad_mask_token deterministic and within rounding of float64),
gradcheck, opcheck, a 200-case fuzz, bad input, and the whole model with the op."""
import random

import pytest
import torch

from mae_fast import _ext, backends, reference
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops.unshuffle import unshuffle

# the module (mae_fast.ops re-exports the function under the same name)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

requires_ext = pytest.mark.skipif(not _ext.has_op("unshuffle_scatter"),
                                  reason=f"mae_fast._C not built: {_ext.LOAD_ERROR}")


def make_inputs(N, L, K, D, dtype=torch.float32, with_pos=True, device=None):
    """x (N, 1+K, D), mask_token (1, 1, D), ids_restore (N, L) as the model makes it, pos (1, 1+L, D),
    on ``device`` (None: torch's default device, CUDA under the ``device`` fixture's cuda param)."""
    noise = torch.rand(N, L)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1).to(device)
    x = torch.randn(N, 1 + K, D, dtype=torch.float64).to(dtype).to(device)
    mask_token = torch.randn(1, 1, D, dtype=torch.float64).to(dtype).to(device)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64).to(dtype).to(device) if with_pos else None
    return x, mask_token, ids_restore, pos


def run_with_grads(fn, x, mask_token, ids_restore, pos, grad_out):
    """out and (grad_x, grad_mask_token, grad_pos) of fn at detached copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, mask_token, pos)]
    out = fn(leaves[0], leaves[1], ids_restore, leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def op(x, mask_token, ids_restore, pos):
    return torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos)


def mask_token_grad_float64(grad_out, ids_restore, K):
    """Exact-ish oracle: the sum of grad_out over removed positions, in float64."""
    removed = (ids_restore >= K).unsqueeze(-1)  # (N, L, 1)
    return (grad_out[:, 1:].double() * removed).sum(dim=(0, 1)).view(1, 1, -1)


def assert_mask_grad_close(actual, grad_out, ids_restore, K):
    """Accumulated in float (double for double) and rounded once: within one ulp of the result plus
    the accumulator's rounding over the summed terms."""
    expected = mask_token_grad_float64(grad_out, ids_restore, K)
    terms = int((ids_restore >= K).sum())
    acc_eps = torch.finfo(torch.float64 if actual.dtype == torch.float64 else torch.float32).eps
    scale = grad_out.double().abs().max().item() if grad_out.numel() else 0.0
    atol = torch.finfo(actual.dtype).eps * expected.abs().max().item() + 2 * terms * acc_eps * scale + 1e-30
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=atol)


def check_against_reference(N, L, K, D, dtype, with_pos, pos_requires_grad=True):
    x, mask_token, ids_restore, pos = make_inputs(N, L, K, D, dtype, with_pos)
    grad_out = torch.randn(N, 1 + L, D, dtype=torch.float64).to(dtype)
    out, grads = run_with_grads(op, x, mask_token, ids_restore, pos, grad_out)
    out_ref, grads_ref = run_with_grads(reference.unshuffle, x, mask_token, ids_restore, pos, grad_out)
    assert out.dtype == out_ref.dtype and out.shape == (N, 1 + L, D)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # bit-exact forward
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=0, atol=0)  # grad_x: a permutation of rows
    assert_mask_grad_close(grads[1], grad_out, ids_restore, K)
    if with_pos:  # the broadcast add's backward: the same sum over N as the reference
        torch.testing.assert_close(grads[2], grads_ref[2], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("N,L,K,D", [(3, 7, 2, 5), (2, 16, 4, 64), (4, 49, 12, 24), (1, 5, 0, 8), (2, 6, 6, 3),
                                     (3, 40, 10, 17)])
def test_matches_reference(N, L, K, D, dtype, with_pos, device):
    check_against_reference(N, L, K, D, dtype, with_pos)


@requires_ext
def test_fuzz_200_random_shapes_and_dtypes():
    rng = random.Random(1234)
    for case in range(200):
        N, L = rng.randint(1, 4), rng.randint(1, 40)
        K, D = rng.randint(0, L), rng.choice([1, 2, 3, 4, 7, 8, 16, 24, 33])
        dtype, with_pos = rng.choice(DTYPES), rng.random() < 0.7
        try:
            check_against_reference(N, L, K, D, dtype, with_pos)
        except AssertionError as e:
            raise AssertionError(f"case {case}: N={N} L={L} K={K} D={D} {dtype} pos={with_pos}") from e


@requires_ext
def test_mask_token_grad_is_deterministic_across_runs_and_threads(device):
    N, L, K, D = 16, 196, 49, 64  # several chunks per sample, work split across threads
    x, mask_token, ids_restore, pos = make_inputs(N, L, K, D, torch.float32)
    grad_out = torch.randn(N, 1 + L, D)
    grads = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            grads.append(torch.ops.mae_fast.unshuffle_scatter_backward(grad_out, ids_restore, K))
    finally:
        torch.set_num_threads(threads)
    for grad_x, grad_mask_token in grads[1:]:
        assert torch.equal(grad_x, grads[0][0])
        assert torch.equal(grad_mask_token.view(torch.int32), grads[0][1].view(torch.int32))  # same bits
    assert_mask_grad_close(grads[0][1], grad_out, ids_restore, K)


@requires_ext
@pytest.mark.parametrize("with_pos", [True, False])
def test_gradcheck_float64(with_pos, device):
    x, mask_token, ids_restore, pos = make_inputs(2, 9, 3, 4, torch.float64, with_pos)
    inputs = [x.requires_grad_(), mask_token.requires_grad_()] + ([pos.requires_grad_()] if with_pos else [])

    def fn(*args):
        return op(args[0], args[1], ids_restore, args[2] if with_pos else None)

    assert torch.autograd.gradcheck(fn, inputs)


@requires_ext
@pytest.mark.parametrize("sample", ["pos", "no_pos", "frozen_pos", "fp32", "no_grad", "all_masked"])
def test_opcheck(sample, device):
    N, L, K, D, dtype = (2, 6, 0, 3, torch.float64) if sample == "all_masked" else (3, 7, 2, 5, torch.float64)
    dtype = torch.float32 if sample == "fp32" else dtype
    x, mask_token, ids_restore, pos = make_inputs(N, L, K, D, dtype, with_pos=sample != "no_pos")
    if sample != "no_grad":
        x.requires_grad_()
        mask_token.requires_grad_()
    if pos is not None and sample not in ("frozen_pos", "no_grad"):
        pos.requires_grad_()
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_scatter.default, (x, mask_token, ids_restore, pos))
    grad_out = torch.randn(N, 1 + L, D, dtype=dtype)
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_scatter_backward.default, (grad_out, ids_restore, K))


@requires_ext
def test_meta_tensors_give_shapes_through_forward_and_backward():
    x = torch.empty(3, 5, 8, device="meta", requires_grad=True)
    mask_token = torch.empty(1, 1, 8, device="meta", requires_grad=True)
    ids_restore = torch.empty(3, 16, dtype=torch.long, device="meta")
    pos = torch.empty(1, 17, 8, device="meta")
    assert backends.choose("unshuffle", "meta", "auto").impl == "c++"
    out = unshuffle(x, mask_token, ids_restore, pos)
    assert out.shape == (3, 17, 8) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape and mask_token.grad.shape == mask_token.shape


@requires_ext
def test_torch_compile_fullgraph_forward_and_backward(device):
    x, mask_token, ids_restore, pos = make_inputs(2, 10, 3, 8, torch.float32)
    grad_out = torch.randn(2, 11, 8)

    def decoder_input(x, mask_token, ids_restore, pos):
        return unshuffle(x, mask_token, ids_restore, pos, backend="fast") * 2.0

    compiled = torch.compile(decoder_input, fullgraph=True, backend="aot_eager")
    out, grads = run_with_grads(compiled, x, mask_token, ids_restore, pos, grad_out)
    out_ref, grads_ref = run_with_grads(lambda *a: reference.unshuffle(*a) * 2.0, x, mask_token, ids_restore, pos,
                                        grad_out)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads_ref[1])


# ------------------------------------------------------------------------------------------------
# the public function: promotes and makes contiguous like the reference accepts
@requires_ext
@pytest.mark.parametrize("autocast", [False, True])
def test_public_function_promotes_dtypes_like_the_reference(autocast, device):
    x, mask_token, ids_restore, pos = make_inputs(2, 10, 3, 8, torch.bfloat16)
    mask_token, pos = mask_token.float(), pos.float()  # bf16 activations, fp32 parameters (autocast)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = unshuffle(x, mask_token, ids_restore, pos, backend="fast")
        expected = reference.unshuffle(x, mask_token, ids_restore, pos)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@requires_ext
def test_public_function_accepts_non_contiguous_inputs(device):
    x, mask_token, ids_restore, pos = make_inputs(2, 10, 3, 16, torch.float32)
    x_strided = torch.randn(2, 4, 32)[:, :, ::2]
    ids_t = ids_restore.t().contiguous().t()  # same values, column-major
    assert not x_strided.is_contiguous() and not ids_t.is_contiguous()
    out = unshuffle(x_strided, mask_token, ids_t, pos, backend="fast")
    torch.testing.assert_close(out, reference.unshuffle(x_strided, mask_token, ids_restore, pos), rtol=0, atol=0)


def test_falls_back_to_reference_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "LOADED", False)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ImportError: pretend it was not built")
    backends.clear_cache()
    try:
        choice = backends.choose("unshuffle", "cpu", "auto")
        assert choice.impl == "reference" and "not built" in choice.reason
        with pytest.raises(RuntimeError, match="not built"):
            backends.choose("unshuffle", "cpu", "fast")
        x, mask_token, ids_restore, pos = make_inputs(2, 6, 2, 4)
        torch.testing.assert_close(unshuffle(x, mask_token, ids_restore, pos),
                                   reference.unshuffle(x, mask_token, ids_restore, pos), rtol=0, atol=0)
    finally:
        monkeypatch.undo()
        backends.clear_cache()


@requires_ext
def test_cuda_kernel_registered_iff_built_with_cuda():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("mae_fast::unshuffle_scatter", "CUDA")
    assert has_cuda_kernel == _ext.built_with_cuda()
    assert backends.choose("unshuffle", "cuda", "auto").impl == ("c++" if _ext.built_with_cuda() else "reference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
@requires_ext
def test_cuda_call_without_a_gpu_raises_cleanly():
    """Documents the no-GPU behaviour: the error comes from torch (no CUDA device) before the op
    runs, as a Python exception rather than a crash."""
    x, mask_token, ids_restore, pos = make_inputs(2, 6, 2, 4)
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ops.mae_fast.unshuffle_scatter(x.to("cuda"), mask_token.to("cuda"), ids_restore.to("cuda"), None)


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.LOADED and _ext.built_with_cuda()),
                    reason="needs a GPU and mae_fast._C built with CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 24, 5])  # 16-byte vectors, vectors for some dtypes only, scalars
def test_cuda_matches_cpu_op(dtype, D):
    x, mask_token, ids_restore, pos = make_inputs(8, 196, 49, D, dtype)
    grad_out = torch.randn(8, 197, D, dtype=torch.float64).to(dtype)
    out_cpu, grads_cpu = run_with_grads(op, x, mask_token, ids_restore, pos, grad_out)
    cuda = [t.cuda() for t in (x, mask_token, ids_restore, pos, grad_out)]
    out_gpu, grads_gpu = run_with_grads(op, *cuda[:4], cuda[4])
    _, grads_gpu_again = run_with_grads(op, *cuda[:4], cuda[4])
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=0)
    torch.testing.assert_close(grads_gpu[0].cpu(), grads_cpu[0], rtol=0, atol=0)
    assert torch.equal(grads_gpu[1], grads_gpu_again[1])  # deterministic on the GPU too
    assert_mask_grad_close(grads_gpu[1].cpu(), grad_out, ids_restore, 49)


# ------------------------------------------------------------------------------------------------
# bad input: a clear RuntimeError from the C++ checks, never a crash
def _bad(**overrides):
    x, mask_token, ids_restore, pos = make_inputs(2, 6, 2, 4)
    args = dict(x=x, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos)
    args.update(overrides)
    return args


@requires_ext
@pytest.mark.parametrize("name,overrides,match", [
    ("x 2-D", dict(x=torch.randn(2, 4)), r"x must be \(N, 1\+K, D\)"),
    ("x integer", dict(x=torch.zeros(2, 3, 4, dtype=torch.int32)), "x must be float32"),
    ("mask dtype", dict(mask_token=torch.randn(1, 1, 4, dtype=torch.float64)), "mask_token dtype"),
    ("mask shape", dict(mask_token=torch.randn(1, 4)), r"mask_token must be \(1, 1, D\)"),
    ("mask D", dict(mask_token=torch.randn(1, 1, 5)), r"mask_token must be \(1, 1, D\)"),
    ("ids int32", dict(ids_restore=torch.zeros(2, 6, dtype=torch.int32)), "ids_restore must be int64"),
    ("ids N", dict(ids_restore=torch.arange(6).repeat(3, 1)), r"ids_restore must be \(N, L\)"),
    ("ids 1-D", dict(ids_restore=torch.arange(6)), r"ids_restore must be \(N, L\)"),
    ("K > L", dict(ids_restore=torch.arange(1).repeat(2, 1), pos_embed=None), "need K <= L"),
    ("ids too big", dict(ids_restore=torch.tensor([[0, 1, 2, 3, 4, 6]] * 2)), "out of range"),
    ("ids negative", dict(ids_restore=torch.tensor([[0, 1, 2, 3, 4, -1]] * 2)), "out of range"),
    ("ids repeated", dict(ids_restore=torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 3, 5]])), "not a permutation"),
    ("pos length", dict(pos_embed=torch.randn(1, 6, 4)), r"pos_embed must be \(1, 1\+L, D\)"),
    ("pos batch", dict(pos_embed=torch.randn(2, 7, 4)), r"pos_embed must be \(1, 1\+L, D\)"),
    ("pos dtype", dict(pos_embed=torch.randn(1, 7, 4, dtype=torch.float16)), "pos_embed dtype"),
    ("x strided", dict(x=torch.randn(2, 3, 8)[:, :, ::2]), "x must be contiguous"),
    ("ids strided", dict(ids_restore=torch.arange(6).repeat(2, 2)[:, ::2]), "ids_restore must be contiguous"),
    ("pos strided", dict(pos_embed=torch.randn(1, 7, 8)[:, :, ::2]), "pos_embed must be contiguous"),
    ("device", dict(mask_token=torch.randn(1, 1, 4, device="meta")), "mask_token is on meta"),
])
def test_bad_input_raises_clearly(name, overrides, match):
    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mae_fast.unshuffle_scatter(args["x"], args["mask_token"], args["ids_restore"], args["pos_embed"])


@requires_ext
@pytest.mark.parametrize("grad_out,ids_restore,len_keep,match", [
    (torch.randn(2, 7, 4), torch.arange(6).repeat(2, 1), 7, "len_keep = 7"),
    (torch.randn(2, 7, 4), torch.arange(6).repeat(2, 1), -1, "len_keep = -1"),
    (torch.randn(2, 6, 4), torch.arange(6).repeat(2, 1), 2, "expected 1\\+L = 7"),
    (torch.randn(2, 7, 4), torch.tensor([[0, 1, 2, 3, 4, 9]] * 2), 2, "out of range"),
    (torch.randn(2, 7, 8)[:, :, ::2], torch.arange(6).repeat(2, 1), 2, "grad_out must be contiguous"),
    (torch.zeros(2, 7, 4, dtype=torch.int64), torch.arange(6).repeat(2, 1), 2, "grad_out must be float32"),
])
def test_backward_op_bad_input_raises_clearly(grad_out, ids_restore, len_keep, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mae_fast.unshuffle_scatter_backward(grad_out, ids_restore, len_keep)


# ------------------------------------------------------------------------------------------------
# the whole model: backend="auto" on CPU runs this op; it equals backend="reference"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)


@requires_ext
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-5, 1e-6)])
def test_model_with_the_op_equals_reference(dtype, rtol, atol):
    fast = MaskedAutoencoderViT(**TINY, backend="auto", attn_backend="math").to(dtype)
    ref = MaskedAutoencoderViT(**TINY, backend="reference").to(dtype)
    with torch.no_grad():
        fast.mask_token.normal_(std=0.02)
    ref.load_state_dict(fast.state_dict())
    assert fast.backend_choices()["unshuffle"].impl == "c++"
    imgs = torch.randn(3, 3, 32, 32, dtype=dtype)
    noise = torch.rand(3, 16)
    loss, pred, mask = fast(imgs, mask_ratio=0.75, noise=noise)
    loss_ref, pred_ref, mask_ref = ref(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(mask, mask_ref, rtol=0, atol=0)
    torch.testing.assert_close(pred, pred_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_ref[name].grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    assert fast.mask_token.grad.abs().max() > 0  # the op's mask-token gradient reached the parameter
