"""Defects found by the GPU review (issue #11 §4), each pinned by a test that fails without its
fix: the gemm mode's strided bias, the unshuffle backward at L = 0, the index contract (memory-
safe kernels, checks only on CPU or under MAE_FAST_DEBUG=1), long rows for random masking, ROCm
and per-device-index backend choices."""
import os
import warnings

import pytest
import torch

import mae_fast
from mae_fast import _ext, backends, ops, reference
from mae_fast.ops import _checks
from mae_fast.ops import masking as masking_op
from mae_fast.ops import patch_embed as pe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton_runs = pytest.mark.skipif(not pe._triton_runs(torch.device("cpu")),
                                 reason="needs triton importable and TRITON_INTERPRET=1")
needs_unshuffle_op = pytest.mark.skipif(not _ext.has_op("unshuffle_scatter"),
                                        reason="mae_fast._C is not built")


def _kept(N, L, mask_ratio):
    return reference.masking_indices(torch.rand(N, L), reference.num_keep(L, mask_ratio))[0]


# ---- gemm mode: a strided bias -------------------------------------------------------------

@triton_runs
def test_gemm_mode_reads_a_strided_bias(monkeypatch):
    """The GEMM's epilogue read bias[d] at bias_ptr + d: a bias view with stride 3 (a column of
    a (D, 3) table) gave another column's values."""
    monkeypatch.setenv("MAE_FAST_PATCH_EMBED", "gemm")
    N, C, H, W, p, D = 2, 3, 8, 12, 4, 20
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W)
    weight = torch.randn(D, C, p, p, requires_grad=True)
    big = torch.randn(D, 3, requires_grad=True)
    bias = big[:, 1]  # stride 3
    assert bias.stride() == (3,)
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)
    ids_keep = _kept(N, L, 0.5)
    got = ops.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep, backend="fast")
    want = reference.patch_embed_masked(imgs, weight, bias, pos_embed, cls_token, ids_keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1.3e-6)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (weight, big, cls_token), grad)
    g_want = torch.autograd.grad(want, (weight, big, cls_token), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- unshuffle backward with L = 0 ---------------------------------------------------------

@needs_unshuffle_op
def test_unshuffle_backward_with_no_patches_writes_the_cls_row():
    """L = 0 (no patch rows): grad_x is just the cls row. Its only writer was the per-chunk
    loop, which had no chunk to run, so grad_x[:, 0] was uninitialised memory."""
    for trial in range(4):  # fresh allocations each time, holding whatever came before
        N, D = 3, 5 + trial
        grad_out = torch.arange(N * D, dtype=torch.float32).reshape(N, 1, D) + 7.0 * (trial + 1)
        ids_restore = torch.empty(N, 0, dtype=torch.long)
        grad_x, grad_mask_token = torch.ops.mae_fast.unshuffle_scatter_backward(grad_out, ids_restore, 0)
        assert torch.equal(grad_x, grad_out)
        assert torch.equal(grad_mask_token, torch.zeros(1, 1, D))


@needs_unshuffle_op
def test_unshuffle_with_no_patches_matches_the_reference_forward_and_backward():
    x = torch.randn(2, 1, 6, requires_grad=True)
    mask_token = torch.randn(1, 1, 6, requires_grad=True)
    ids_restore = torch.empty(2, 0, dtype=torch.long)
    got = ops.unshuffle(x, mask_token, ids_restore, backend="fast")
    want = reference.unshuffle(x, mask_token, ids_restore)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, mask_token), grad),
                    torch.autograd.grad(want, (x, mask_token), grad)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- the index contract ------------------------------------------------------------------

def test_index_checks_run_on_cpu_always_and_on_cuda_only_under_mae_fast_debug(monkeypatch):
    monkeypatch.delenv("MAE_FAST_DEBUG", raising=False)
    assert _checks.index_check_runs(torch.device("cpu"))
    assert not _checks.index_check_runs(torch.device("cuda"))  # no sync, no device assert
    assert not _checks.index_check_runs(torch.device("meta"))
    monkeypatch.setenv("MAE_FAST_DEBUG", "0")
    assert not _checks.index_check_runs(torch.device("cuda"))
    monkeypatch.setenv("MAE_FAST_DEBUG", "1")
    assert _checks.index_check_runs(torch.device("cuda"))
    assert not _checks.index_check_runs(torch.device("meta"))


def test_no_device_side_assert_anywhere():
    """A device-side assert kills the process's CUDA context (and hangs its DDP peers): the
    contract is memory-safe kernels plus the MAE_FAST_DEBUG=1 host check instead."""
    hits = []
    for folder in ("mae_fast", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    if "_assert_async" in open(path).read():
                        hits.append(os.path.relpath(path, ROOT))
    assert not hits


def test_cpu_index_check_raises_for_bad_values():
    ids = torch.tensor([[0, 3], [1, 4]])
    _checks.check_ids(ids, 5, "ids_keep")
    with pytest.raises(ValueError, match=r"ids_keep values must lie in \[0, 4\)"):
        _checks.check_ids(ids, 4, "ids_keep")
    with pytest.raises(ValueError, match="distinct"):
        _checks.check_ids(torch.tensor([[1, 1]]), 4, "ids_keep", distinct=True)


# ids of a 2x3 grid (L = 6) with out-of-range entries: L, -1, a large value, and 2^32 + 1, which
# an int32 narrowing before the range test would have read as patch 1
_BAD = (6, -1, 10 ** 6, 2 ** 32 + 1)


def _ids_with_bad_entries():
    ids_keep = torch.tensor([[0, 6, 5, -1], [10 ** 6, 2, 2 ** 32 + 1, 4]])  # (N=2, K=4)
    bad = (ids_keep < 0) | (ids_keep >= 6)
    return ids_keep, bad


@triton_runs
def test_gather_and_scatter_kernels_are_memory_safe_on_any_index():
    from mae_fast.kernels import patch_gather
    N, C, p = 2, 3, 4
    imgs = torch.randn(N, C, 2 * p, 3 * p)
    ids_keep, bad = _ids_with_bad_entries()
    patches = patch_gather.gather_patches(imgs, ids_keep, p)  # (N, K, C*p*p)
    assert torch.equal(patches[bad], torch.zeros(int(bad.sum()), C * p * p))
    good = torch.where(~bad, ids_keep, 0)
    want = pe._patch_rows(imgs, p).gather(1, good.unsqueeze(-1).expand(-1, -1, C * p * p))
    assert torch.equal(patches[~bad], want[~bad])
    # scatter: bad entries write nothing
    grad = torch.randn(N, 4, C * p * p)
    grad_imgs = patch_gather.scatter_patches(grad, ids_keep, p, torch.zeros_like(imgs))
    rows = pe._patch_rows(grad_imgs, p)  # (N, L, C*p*p)
    for n in range(N):
        for k in range(4):
            if not bad[n, k]:
                assert torch.equal(rows[n, ids_keep[n, k]], grad[n, k])
    written = {(n, int(ids_keep[n, k])) for n in range(N) for k in range(4) if not bad[n, k]}
    for n in range(N):
        for l in range(6):
            if (n, l) not in written:
                assert torch.equal(rows[n, l], torch.zeros(C * p * p))


@triton_runs
def test_pos_cls_kernel_adds_a_zero_row_for_an_out_of_range_index():
    from mae_fast.kernels import patch_gather
    ids_keep, bad = _ids_with_bad_entries()
    N, K, D, L = 2, 4, 10, 6
    x, pos_embed, cls_token = torch.randn(N, K, D), torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    out = patch_gather.add_pos_cls(x, pos_embed, cls_token, ids_keep, torch.float32)
    good = torch.where(~bad, ids_keep, 0)
    want = x + torch.where(bad.unsqueeze(-1), 0.0, pos_embed[0, 1:][good])
    assert torch.equal(out[:, 1:], want)
    assert torch.equal(out[:, 0], (cls_token + pos_embed[:, :1]).expand(N, 1, D)[:, 0])


@triton_runs
def test_gemm_kernels_are_memory_safe_on_any_index():
    """Out-of-range rows: no access outside the tensors; what they compute is documented (a zero
    patch plus patch 0's positional row forward, patch 0's pixels backward), the other rows are
    exact."""
    from mae_fast.kernels import patch_embed_gemm as gemm
    N, C, p, D, L = 2, 3, 4, 12, 6
    imgs = torch.randn(N, C, 2 * p, 3 * p)
    weight, bias = torch.randn(D, C, p, p), torch.randn(D)
    pos_embed, cls_token = torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    ids_keep, bad = _ids_with_bad_entries()
    out = gemm.patch_embed_gemm(imgs, weight, bias, pos_embed, cls_token, ids_keep,
                                torch.float32, torch.float32)
    clamped = torch.where(~bad, ids_keep, 0)
    patches = pe._patch_rows(imgs, p).gather(1, clamped.unsqueeze(-1).expand(-1, -1, C * p * p))
    patches = patches * (~bad).unsqueeze(-1)  # a bad row's patch reads as zeros
    want = patches @ weight.reshape(D, -1).t() + bias + pos_embed[0, 1:][clamped]
    torch.testing.assert_close(out[:, 1:], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], (cls_token + pos_embed[:, :1])[0].expand(N, D))
    # backward: a bad row contributes patch 0's pixels
    grad_out = torch.randn(N, 1 + 4, D)
    grad_w, grad_b, grad_cls = gemm.patch_embed_gemm_backward(
        grad_out, imgs, ids_keep, list(weight.shape), torch.float32, torch.float32, torch.float32,
        torch.float32)
    patches0 = pe._patch_rows(imgs, p).gather(1, clamped.unsqueeze(-1).expand(-1, -1, C * p * p))
    want_w = grad_out[:, 1:].reshape(-1, D).t() @ patches0.reshape(-1, C * p * p)
    torch.testing.assert_close(grad_w, want_w.reshape(weight.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b, grad_out[:, 1:].sum((0, 1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_cls, grad_out[:, :1].sum(0, keepdim=True), atol=1e-5, rtol=1e-5)


# ---- random masking: long rows ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "fast"])
def test_random_masking_never_raises_for_a_long_row(backend):
    """The rank kernel is O(L^2) per row (and one row's keys must fit one block's shared memory
    on CUDA): past the crossover the argsort path runs, for 'auto' and 'fast' alike."""
    L = 3 * masking_op.RANK_MAX_L["cpu"] + 5
    noise = torch.rand(2, L)
    len_keep = L // 4
    got = masking_op.masking_indices(noise, len_keep, backend=backend)
    want = reference.masking_indices(noise, len_keep)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_random_masking_path_per_row_length():
    cpu = masking_op.RANK_MAX_L["cpu"]
    assert masking_op.rank_kernel_runs(torch.device("cpu"), cpu)
    assert not masking_op.rank_kernel_runs(torch.device("cpu"), cpu + 1)
    cuda = masking_op.RANK_MAX_L["cuda"]
    assert masking_op.rank_kernel_runs(torch.device("cuda", 0), 196)  # ViT-B/16 at 224 px
    assert not masking_op.rank_kernel_runs(torch.device("cuda", 0), cuda + 1)
    # the shared-memory limit of the CUDA kernel (48 KiB: 12288 fp32 keys, 6144 fp64) is above
    # the crossover, so 'auto' never hands the kernel a row it refuses
    assert cuda <= 6144


# ---- backend choice: ROCm, per device index ---------------------------------------------

FUSED_OPS = ("patch_embed_masked", "masked_loss", "unshuffle", "random_masking")


def test_rocm_runs_the_reference_with_one_message(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # gfx90a
    monkeypatch.setattr(backends, "_rocm_warned", False)
    backends.clear_cache()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for op in FUSED_OPS:
                for device in ("cuda", "cuda:0", "cuda:1"):
                    choice = backends.choose(op, device, "auto")
                    assert choice.impl == "reference" and "ROCm" in choice.reason, choice
            with pytest.raises(RuntimeError, match="ROCm"):
                backends.choose("masked_loss", "cuda:0", "fast")
        rocm = [w for w in caught if "ROCm" in str(w.message)]
        assert len(rocm) == 1, [str(w.message) for w in caught]
        # CPU is unaffected
        assert backends.choose("unshuffle", "cpu", "auto").impl == backends.choose(
            "unshuffle", "cpu", "auto").impl
    finally:
        backends.clear_cache()


def test_backend_choice_is_per_device_index(monkeypatch):
    """A node with an sm_90 GPU as cuda:0 and an sm_75 one as cuda:1: each gets its own answer,
    whichever is asked first (the cache key holds the index)."""
    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: caps[0 if device is None else device])
    for order in ((0, 1), (1, 0)):
        backends.clear_cache()
        try:
            got = {i: backends.choose("masked_loss", f"cuda:{i}", "auto") for i in order}
        finally:
            backends.clear_cache()
        assert got[0].impl == "triton", got[0]
        assert got[1].impl == "reference" and "cuda:1" in got[1].reason and "7.5 is below 8.0" in got[1].reason


def test_model_backend_choices_use_the_device_index(monkeypatch):
    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: caps[0 if device is None else device])
    model = mae_fast.MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    backends.clear_cache()
    try:
        fast = model.backend_choices("cuda:0")
        slow = model.backend_choices("cuda:1")
    finally:
        backends.clear_cache()
    assert fast["masked_loss"].impl == "triton"
    assert slow["masked_loss"].impl == "reference"
