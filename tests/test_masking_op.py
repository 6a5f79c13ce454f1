"""The C++ random-masking op (``torch.ops.mae_fast.random_masking``, csrc/masking.cpp) against the
official index math (``mae_fast.reference.masking_indices``): exactly equal on noise without ties
(every dtype, odd shapes, len_keep 0 / 1 / L-1 / L, a 200-case fuzz), equal to a stable argsort on
noise with many ties, NaN / inf / -0.0 ordered as torch sorts them, the mask in the default dtype,
opcheck, meta shapes, torch.compile, bad input, and the model with the op."""
import random

import pytest
import torch

from mae_fast import _ext, backends, reference
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops.masking import masking_indices


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

requires_ext = pytest.mark.skipif(not _ext.has_op("random_masking"),
                                  reason=f"mae_fast._C not built: {_ext.LOAD_ERROR}")


def op(noise, len_keep):
    return torch.ops.mae_fast.random_masking(noise, len_keep)


def tie_free_noise(N, L, dtype, generator=None):
    """(N, L) noise whose rows have no two equal values in ``dtype``. fp32 / fp64: torch.rand (what
    the model draws), redrawn in the rare row with a tie. fp16 / bf16 (too few values in [0, 1) for
    long rows): a random permutation of integers, shifted and scaled by a power of two (exact for
    L <= 256 in bf16, 2048 in fp16)."""
    if dtype in (torch.float32, torch.float64):
        noise = torch.rand(N, L, dtype=dtype, generator=generator)
        for n in range(N):
            while noise[n].unique().numel() < L:
                noise[n] = torch.rand(L, dtype=dtype, generator=generator)
        return noise
    assert L <= 256
    rows = [torch.randperm(L, generator=generator) - L // 2 for _ in range(N)]
    noise = torch.stack(rows).to(torch.float64) if N else torch.empty(0, L, dtype=torch.float64)
    scale = 2.0 ** random.Random(N * 1000 + L).randint(-12, 4)
    return (noise * scale).to(dtype)


def stable_masking_indices(noise, len_keep):
    """The official index math with a stable argsort (ties by index): the op's documented rule."""
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_shuffle[:, :len_keep], ids_restore, mask


def assert_equal_outputs(actual, expected, what=""):
    for name, a, e in zip(("ids_keep", "ids_restore", "mask"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {name}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert torch.equal(a, e), f"{what} {name} differs:\n{a}\n{e}"


# ------------------------------------------------------------------------------------------------
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,L", [(3, 7), (1, 1), (2, 196), (5, 33), (4, 256), (2, 2)])
def test_matches_reference_without_ties(N, L, dtype, device):
    noise = tie_free_noise(N, L, dtype)
    for len_keep in sorted({0, 1, L // 4, L - 1, L} - {-1}):
        assert_equal_outputs(op(noise, len_keep), reference.masking_indices(noise, len_keep),
                             f"N={N} L={L} len_keep={len_keep} {dtype}")
        assert_equal_outputs(masking_indices(noise, len_keep, backend="fast"),
                             reference.masking_indices(noise, len_keep))


@requires_ext
def test_fuzz_200_random_shapes_dtypes_and_len_keep():
    rng = random.Random(4321)
    gen = torch.Generator().manual_seed(4321)
    for case in range(200):
        N, L, dtype = rng.randint(0, 6), rng.randint(1, 256), rng.choice(DTYPES)
        len_keep = rng.choice([0, 1, L - 1, L, rng.randint(0, L)])
        noise = tie_free_noise(N, L, dtype, gen)
        try:
            assert_equal_outputs(op(noise, len_keep), reference.masking_indices(noise, len_keep))
        except AssertionError as e:
            raise AssertionError(f"case {case}: N={N} L={L} len_keep={len_keep} {dtype}") from e


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [1, 2, 5])
def test_ties_are_broken_by_index_like_a_stable_argsort(dtype, levels, device):
    N, L = 6, 196
    noise = (torch.randint(0, levels, (N, L)).to(torch.float64) / 4).to(dtype)  # many ties per row
    for len_keep in (0, 1, 49, 100, L - 1, L):
        assert_equal_outputs(op(noise, len_keep), stable_masking_indices(noise, len_keep),
                             f"levels={levels} len_keep={len_keep}")


@requires_ext
def test_with_ties_the_kept_noise_values_equal_the_officials():
    """torch.argsort (not stable) may order equal values differently, so the kept *set* can differ
    from the official only between patches of equal noise: the kept noise values (as a multiset)
    and the mask away from the boundary value are the same."""
    N, L, len_keep = 16, 196, 49
    noise = torch.randint(0, 40, (N, L)).float() / 40
    ids_keep, ids_restore, mask = op(noise, len_keep)
    ids_keep_ref, _, mask_ref = reference.masking_indices(noise, len_keep)
    kept = torch.gather(noise, 1, ids_keep).sort(1).values
    kept_ref = torch.gather(noise, 1, ids_keep_ref).sort(1).values
    assert torch.equal(kept, kept_ref)
    boundary = noise.sort(1).values[:, len_keep - 1:len_keep]  # (N, 1) the largest kept value
    away = noise != boundary
    assert torch.equal(mask[away], mask_ref[away])
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - len_keep)))


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_and_signed_zero_sort_like_torch(dtype, device):
    """torch sorts NaN as the largest value (every NaN equal), -0.0 equal to +0.0."""
    nan, inf = float("nan"), float("inf")
    row = [nan, 0.0, -0.0, inf, -inf, -nan, 1.0, 0.0, -0.0, -2.5, nan, 0.5]
    noise = torch.tensor([row, row[::-1], [nan] * len(row)], dtype=dtype)
    for len_keep in range(len(row) + 1):
        assert_equal_outputs(op(noise, len_keep), stable_masking_indices(noise, len_keep), f"len_keep={len_keep}")


@requires_ext
@pytest.mark.parametrize("N,L", [(0, 0), (3, 0), (0, 5)])
def test_empty_noise(N, L, device):
    noise = torch.rand(N, L)
    assert_equal_outputs(op(noise, 0), reference.masking_indices(noise, 0))


@requires_ext
def test_rows_are_independent_and_ids_restore_is_a_permutation(device):
    noise = torch.rand(64, 196)
    ids_keep, ids_restore, mask = op(noise, 49)
    assert torch.equal(ids_restore.sort(1).values, torch.arange(196).expand(64, -1))
    assert torch.equal(torch.gather(ids_restore, 1, ids_keep), torch.arange(49).expand(64, -1))
    single = [op(noise[n:n + 1].clone(), 49) for n in (0, 17, 63)]
    for n, (k, r, m) in zip((0, 17, 63), single):
        assert torch.equal(k[0], ids_keep[n]) and torch.equal(r[0], ids_restore[n]) and torch.equal(m[0], mask[n])


@requires_ext
def test_same_result_with_one_thread():
    noise = torch.rand(32, 196)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(noise, 49)
    finally:
        torch.set_num_threads(threads)
    assert_equal_outputs(op(noise, 49), one)


# ------------------------------------------------------------------------------------------------
# the public function
@requires_ext
@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float32])
def test_mask_has_the_default_dtype_like_the_reference(default_dtype):
    noise = torch.rand(3, 20, dtype=torch.float32)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default_dtype)
        out = masking_indices(noise, 5, backend="fast")
        expected = reference.masking_indices(noise, 5)
    finally:
        torch.set_default_dtype(previous)
    assert expected[2].dtype == default_dtype
    assert_equal_outputs(out, expected)


@requires_ext
def test_public_function_takes_non_contiguous_noise_and_noise_that_requires_grad(device):
    base = torch.rand(20, 6)
    noise = base.t()  # (6, 20), column-major
    assert not noise.is_contiguous()
    assert_equal_outputs(masking_indices(noise, 7, backend="fast"), reference.masking_indices(noise, 7))
    noise = torch.rand(4, 16, requires_grad=True)
    out = masking_indices(noise, 4, backend="fast")
    assert not any(t.requires_grad for t in out)
    assert_equal_outputs(out, reference.masking_indices(noise.detach(), 4))


@requires_ext
def test_meta_tensors_give_shapes():
    noise = torch.empty(5, 196, device="meta")
    assert backends.choose("random_masking", "meta", "auto").impl == "c++"
    ids_keep, ids_restore, mask = masking_indices(noise, 49)
    assert ids_keep.shape == (5, 49) and ids_keep.dtype == torch.int64 and ids_keep.device.type == "meta"
    assert ids_restore.shape == (5, 196) and ids_restore.dtype == torch.int64
    assert mask.shape == (5, 196) and mask.dtype == torch.get_default_dtype()


@requires_ext
@pytest.mark.parametrize("sample", ["fp32", "fp64", "fp16", "bf16", "keep_none", "keep_all", "empty_batch"])
def test_opcheck(sample, device):
    dtype = {"fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}.get(sample, torch.float32)
    N, L = (0, 9) if sample == "empty_batch" else (3, 9)
    len_keep = {"keep_none": 0, "keep_all": L}.get(sample, 4)
    noise = tie_free_noise(N, L, dtype)
    torch.library.opcheck(torch.ops.mae_fast.random_masking.default, (noise, len_keep))


@requires_ext
def test_torch_compile_fullgraph(device):
    noise = torch.rand(4, 196)

    def masked_fraction(noise):
        ids_keep, ids_restore, mask = masking_indices(noise, 49, backend="fast")
        return ids_keep + 1, ids_restore, mask.mean(1)

    compiled = torch.compile(masked_fraction, fullgraph=True, backend="aot_eager")
    ids_keep, ids_restore, fraction = compiled(noise)
    ids_keep_ref, ids_restore_ref, mask_ref = reference.masking_indices(noise, 49)
    assert torch.equal(ids_keep, ids_keep_ref + 1) and torch.equal(ids_restore, ids_restore_ref)
    torch.testing.assert_close(fraction, mask_ref.mean(1), rtol=0, atol=0)


def test_falls_back_to_reference_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "LOADED", False)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ImportError: pretend it was not built")
    backends.clear_cache()
    try:
        choice = backends.choose("random_masking", "cpu", "auto")
        assert choice.impl == "reference" and "not built" in choice.reason
        with pytest.raises(RuntimeError, match="not built"):
            backends.choose("random_masking", "cpu", "fast")
        noise = torch.rand(3, 10)
        assert_equal_outputs(masking_indices(noise, 3), reference.masking_indices(noise, 3))
    finally:
        monkeypatch.undo()
        backends.clear_cache()


@requires_ext
def test_reference_backend_runs_the_official_argsorts(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "masking_indices", lambda *a: calls.append(a) or ("ref",))
    noise = torch.rand(2, 8)
    assert masking_indices(noise, 3, backend="reference") == ("ref",)
    ids_keep, _, _ = masking_indices(noise, 3, backend="auto")  # the op: the reference is not called
    assert ids_keep.shape == (2, 3) and len(calls) == 1


@requires_ext
def test_cuda_kernel_registered_iff_built_with_cuda():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("mae_fast::random_masking", "CUDA")
    assert has_cuda_kernel == _ext.built_with_cuda()
    assert backends.choose("random_masking", "cuda", "auto").impl == ("c++" if _ext.built_with_cuda() else "reference")


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.LOADED and _ext.built_with_cuda()),
                    reason="needs a GPU and mae_fast._C built with CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,L", [(64, 196), (3, 7), (2, 1000), (1, 300)])
def test_cuda_matches_cpu_op(dtype, N, L):
    noise = (torch.randint(0, 50, (N, L)).double() / 50).to(dtype)  # ties too
    noise[0, :3] = float("nan")
    for len_keep in (0, 1, L // 4, L):
        cpu = op(noise, len_keep)
        gpu = op(noise.cuda(), len_keep)
        assert_equal_outputs([t.cpu() for t in gpu], cpu)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.LOADED and _ext.built_with_cuda()),
                    reason="needs a GPU and mae_fast._C built with CUDA")
def test_cuda_rejects_rows_longer_than_shared_memory():
    with pytest.raises(RuntimeError, match="too long"):
        op(torch.rand(2, 1 << 20, device="cuda"), 5)


# ------------------------------------------------------------------------------------------------
# bad input: a clear RuntimeError from the C++ checks, never a crash
@requires_ext
@pytest.mark.parametrize("noise,len_keep,match", [
    (torch.rand(6), 2, r"noise must be \(N, L\)"),
    (torch.rand(2, 3, 4), 2, r"noise must be \(N, L\)"),
    (torch.randint(0, 9, (2, 6)), 2, "noise must be float32"),
    (torch.rand(2, 6, dtype=torch.complex64), 2, "noise must be float32"),
    (torch.rand(6, 2).t(), 2, "noise must be contiguous"),
    (torch.rand(2, 6), -1, r"len_keep = -1 must be in \[0, L = 6\]"),
    (torch.rand(2, 6), 7, r"len_keep = 7 must be in \[0, L = 6\]"),
])
def test_bad_input_raises_clearly(noise, len_keep, match):
    with pytest.raises(RuntimeError, match=match):
        op(noise, len_keep)


# ------------------------------------------------------------------------------------------------
# the whole model: backend="auto" on CPU runs this op; the same masks as backend="reference"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)


@requires_ext
def test_model_with_the_op_equals_reference():
    fast = MaskedAutoencoderViT(**TINY, backend="auto", attn_backend="math").double()
    ref = MaskedAutoencoderViT(**TINY, backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    assert fast.backend_choices("cpu")["random_masking"].impl == "c++"
    assert ref.backend_choices("cpu")["random_masking"].impl == "reference"
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = tie_free_noise(3, 16, torch.float32)
    loss, pred, mask = fast(imgs, mask_ratio=0.75, noise=noise)
    loss_ref, pred_ref, mask_ref = ref(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, mask_ref) and mask.dtype == mask_ref.dtype
    torch.testing.assert_close(pred, pred_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    for got, want in zip(fast.random_masking(x, 0.75, noise), ref.random_masking(x, 0.75, noise)):
        assert torch.equal(got, want)
