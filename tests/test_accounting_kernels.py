"""Every custom op's charge in mae_fast.accounting (KERNEL_CHARGES) against what its kernels
really load, store and launch.

Triton ops: the op's body runs under ``TRITON_INTERPRET=1`` inside ``InterpretedTraffic``, which
records the bytes every ``tl.load`` / ``tl.store`` touches (masked-off lanes excluded, each
address once per launch: the charges' rule) and every launch, plus the torch ops the body runs
around its kernels (a zero fill). The accounting charges the op as the meta trace sees it: one
dispatcher op. The two must agree exactly. The body runs as on CUDA's default path: with
``index_check_runs`` reporting False, so ``check_ids`` (always on for CPU tensors, on CUDA only
with MAE_FAST_DEBUG=1: ops/_checks.py) runs none of its ops, which the accounting does not charge.

C++ ops: the CUDA kernels cannot run here, so their charge is checked against the kernels'
source: the launch sites of each host launcher, the workspace it allocates, and the index
semantics of what each kernel reads (the ids the CPU twin, which shares the index header, uses).
"""
import math
import os
import re
from pathlib import Path

import pytest
import torch

from mae_fast import _ext, accounting
from mae_fast.accounting import Charge, InterpretedTraffic, TrafficCounter, tensor_bytes
from mae_fast.ops import _checks

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs the Triton interpreter (tests/conftest.py sets it)")


def _kept(N, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(N)])


def charged(op, *args) -> Charge:
    """What the accounting charges for one call of ``op`` (dispatched as in a traced step)."""
    counter = TrafficCounter()
    with counter:
        op(*args)
    (record,) = counter.log
    assert record.op == f"mae_fast::{op._name}"
    return Charge(record.read, record.written, record.launches)


def measured(op, *args):
    """What the op's body really does on CUDA's default path: its Triton kernels' loads/stores +
    the torch ops around them, with the index checks off (``index_check_runs`` reports False, as
    it does for CUDA tensors without MAE_FAST_DEBUG=1)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_checks, "index_check_runs", lambda device: False)
        with InterpretedTraffic() as probe:
            op._init_fn(*args)
    return probe


def assert_charge_is_real(op, *args, kernels):
    probe = measured(op, *args)
    assert [k.kernel for k in probe.launches] == kernels
    real = probe.total()
    assert (charged(op, *args).read, charged(op, *args).written, charged(op, *args).launches) == \
        (real.read, real.written, real.launches), [(r.op, r.read, r.written) for r in probe.torch_ops.log]
    return probe


# odd shapes: non-square images, patch grids that are not powers of two, D not a multiple of 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_patches_charge(dtype):
    from mae_fast.ops.patch_embed import gather_patches
    N, C, H, W, p, K = 3, 3, 12, 20, 4, 5
    imgs = torch.randn(N, C, H, W).to(dtype)
    probe = assert_charge_is_real(gather_patches, imgs, _kept(N, 15, K), p,
                                  kernels=["_patch_copy_kernel"])
    # the kernel reads the kept patches only, not the image
    e = imgs.element_size()
    assert probe.launches[0].loaded == N * K * 8 + N * K * C * p * p * e < tensor_bytes(imgs)


def test_scatter_patches_charge_includes_zero_fill_and_no_index_check():
    from mae_fast.ops.patch_embed import scatter_patches
    N, C, H, W, p, K = 2, 3, 12, 8, 4, 4
    grad = torch.randn(N, K, C * p * p)
    probe = assert_charge_is_real(scatter_patches, grad, _kept(N, 6, K), p, H, W, False,
                                  kernels=["_patch_copy_kernel"])
    # the fill a tensor-level count misses, and nothing of the (CUDA: debug-only) distinct check
    assert [r.op for r in probe.torch_ops.log] == ["aten::zero_"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_pos_cls_charge(dtype):
    from mae_fast.ops.patch_embed import add_pos_cls
    N, K, L, D = 3, 5, 9, 40
    x = torch.randn(N, K, D).to(dtype)
    pos, cls = torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    ids = _kept(N, L, K)
    probe = assert_charge_is_real(add_pos_cls, x, pos, cls, ids, kernels=["_add_pos_cls_kernel"])
    rows = 1 + torch.unique(ids).numel()  # pos[0] + the rows ids pick, each read once
    assert probe.launches[0].loaded == tensor_bytes(x) + tensor_bytes(ids) + rows * D * 4 + D * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_pos_cls_backward_charge(dtype):
    from mae_fast.ops.patch_embed import add_pos_cls_backward
    grad_out = torch.randn(3, 1 + 5, 40).to(dtype)
    assert_charge_is_real(add_pos_cls_backward, grad_out, dtype, torch.float32,
                          kernels=["_add_pos_cls_bwd_kernel"])


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_loss_charges(dtype, norm_pix):
    """Forward: two launches (per-patch losses into an fp32 workspace, a one-program reduction),
    reading only the removed patches; backward: one launch."""
    from mae_fast.ops.loss import masked_loss_backward, masked_loss_op
    N, C, H, W, p = 2, 3, 8, 12, 4
    L, P = 6, C * p * p
    imgs, pred = torch.randn(N, C, H, W).to(dtype), torch.randn(N, L, P).to(dtype)
    mask = torch.tensor([[1., 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]])
    probe = assert_charge_is_real(masked_loss_op, imgs, pred, mask, p, norm_pix,
                                  kernels=["_masked_loss_fwd_kernel", "_masked_loss_reduce_kernel"])
    e = imgs.element_size()
    removed = 8
    assert probe.launches[0].loaded == N * L * 4 + removed * P * 2 * e
    assert probe.launches[0].stored == N * L * 4  # the workspace a tensor-level count misses
    loss, mask_sum = masked_loss_op(imgs, pred, mask, p, norm_pix)
    for want_imgs in (False, True):
        assert_charge_is_real(masked_loss_backward, torch.ones((), dtype=loss.dtype), imgs, pred, mask,
                              mask_sum, p, norm_pix, want_imgs, kernels=["_masked_loss_bwd_kernel"])


def _uint8_case(N, C, H, W):
    imgs = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixel_norm = torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]])[:, :C].contiguous()
    return imgs, pixel_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_patches_normalized_charge(dtype):
    """uint8 images: 1 byte a kept pixel (an fp32 image: 4), plus the (2, C) fp32 mean/std once."""
    from mae_fast.ops.patch_embed import gather_patches_normalized
    N, C, H, W, p, K = 3, 3, 12, 20, 4, 5
    imgs, pixel_norm = _uint8_case(N, C, H, W)
    probe = assert_charge_is_real(gather_patches_normalized, imgs, _kept(N, 15, K), p, pixel_norm, dtype,
                                  kernels=["_patch_copy_kernel"])
    assert probe.launches[0].loaded == N * K * 8 + N * K * C * p * p * 1 + 2 * C * 4
    assert probe.launches[0].stored == N * K * C * p * p * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_loss_charges_uint8(norm_pix):
    from mae_fast.ops.loss import masked_loss_backward, masked_loss_op
    N, C, H, W, p = 2, 3, 8, 12, 4
    L, P = 6, C * p * p
    imgs, pixel_norm = _uint8_case(N, C, H, W)
    pred = torch.randn(N, L, P).to(torch.bfloat16)
    mask = torch.tensor([[1., 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]])
    args = (imgs, pred, mask, p, norm_pix, pixel_norm, torch.float32)
    probe = assert_charge_is_real(masked_loss_op, *args,
                                  kernels=["_masked_loss_fwd_kernel", "_masked_loss_reduce_kernel"])
    removed = 8
    assert probe.launches[0].loaded == N * L * 4 + removed * P * (1 + 2) + 2 * C * 4
    loss, mask_sum = masked_loss_op(*args)
    assert_charge_is_real(masked_loss_backward, torch.ones(()), imgs, pred, mask, mask_sum, p, norm_pix,
                          False, pixel_norm, torch.float32, kernels=["_masked_loss_bwd_kernel"])


def test_patch_embed_gemm_charges_uint8():
    from mae_fast.ops.patch_embed import patch_embed_gemm, patch_embed_gemm_backward
    N, C, H, W, p, D, K, L = 2, 3, 8, 12, 4, 24, 3, 6
    imgs, pixel_norm = _uint8_case(N, C, H, W)
    weight, bias = torch.randn(D, C, p, p), torch.randn(D)
    pos, cls, ids = torch.randn(1, 1 + L, D), torch.randn(1, 1, D), _kept(N, L, K)
    assert_charge_is_real(patch_embed_gemm, imgs, weight, bias, pos, cls, ids, torch.float32,
                          pixel_norm, torch.float32, kernels=["_patch_embed_gemm_kernel"])
    assert_charge_is_real(patch_embed_gemm_backward, torch.randn(N, 1 + K, D), imgs, ids, [D, C, p, p],
                          torch.float32, torch.float32, torch.float32, torch.float32, pixel_norm,
                          torch.float32, kernels=["_patch_embed_gemm_bwd_kernel"])


def test_uint8_images_save_image_bytes_on_meta():
    """The counted step: a uint8 image moves 1 byte a pixel where an fp32 one moves 4, in the two
    regions that read it (the encoder input's gather, the loss's target), and nothing else."""
    from functools import partial
    from mae_fast.model import MaskedAutoencoderViT
    arch = partial(MaskedAutoencoderViT, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                   decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    counts = accounting.uint8_image_bytes(arch, batch=4, precision="amp-bf16")
    N, C, P, L, K = 4, 3, 8 * 8 * 3, 16, 4
    kept_pixels, removed_pixels = N * K * P, N * (L - K) * P
    stats = 2 * C * 4
    f, u = counts["float"], counts["uint8"]
    assert f["encoder input"] - u["encoder input"] == kept_pixels * 3 - stats
    # the loss reads the removed patches' pixels in its forward and its backward
    assert f["loss"] - u["loss"] == 2 * (removed_pixels * 3 - stats)


def test_masked_loss_charge_on_meta_uses_the_mask_ratio():
    """On meta the mask's values are unknown: the counter's mask ratio says how many patches the
    kernels read (N * (L - len_keep))."""
    from mae_fast.ops.loss import masked_loss_op
    N, C, H, W, p = 2, 3, 8, 12, 4
    L, P = 6, 48
    args = (torch.empty(N, C, H, W, device="meta"), torch.empty(N, L, P, device="meta"),
            torch.empty(N, L, device="meta"), p, False)
    counter = TrafficCounter(removed_fraction=0.5)
    with counter:
        masked_loss_op(*args)
    removed = N * (L - int(L * 0.5))
    assert counter.log[0].read == (N * L * 4 + removed * P * 8) + (N * L * 4 + N * L * 4)
    assert counter.log[0].launches == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_gemm_charges(dtype):
    from mae_fast.ops.patch_embed import patch_embed_gemm, patch_embed_gemm_backward
    N, C, H, W, p, D, K = 2, 3, 8, 12, 4, 24, 3
    L = 6
    imgs, weight = torch.randn(N, C, H, W).to(dtype), torch.randn(D, C, p, p).to(dtype)
    bias, pos, cls = torch.randn(D).to(dtype), torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    ids = _kept(N, L, K)
    assert_charge_is_real(patch_embed_gemm, imgs, weight, bias, pos, cls, ids, dtype,
                          kernels=["_patch_embed_gemm_kernel"])
    grad_out = torch.randn(N, 1 + K, D).to(dtype)
    assert_charge_is_real(patch_embed_gemm_backward, grad_out, imgs, ids, [D, C, p, p], dtype,
                          dtype, dtype, torch.float32, kernels=["_patch_embed_gemm_bwd_kernel"])


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_charges(dtype, branch, monkeypatch):
    """Forward: one launch reading x (+ branch) and the parameters once; backward: the row kernel
    (dy, dh, h, stats -> dsum + fp32 partial sums per program: 3 programs of 4 rows in tiles of
    2 here) and the one-launch reduction of the partials."""
    from mae_fast.ops import layernorm
    from mae_fast.ops.layernorm import add_layer_norm_backward, add_layer_norm_op
    monkeypatch.setattr(layernorm, "MAX_BWD_PROGRAMS", 4)
    R, D = 11, 600
    x, weight, bias = torch.randn(R, D).to(dtype), torch.randn(D), torch.randn(D)
    br = torch.randn(R, D).to(dtype) if branch else None
    assert_charge_is_real(add_layer_norm_op, x, br, weight, bias, 1e-6, dtype, kernels=["_add_ln_fwd_kernel"])
    h, y, mean, rstd = add_layer_norm_op(x, br, weight, bias, 1e-6, dtype)
    dy, dh = torch.randn(R, D).to(dtype), (torch.randn(R, D).to(dtype) if branch else None)
    probe = assert_charge_is_real(add_layer_norm_backward, dy, dh, h if branch else x, weight, mean, rstd,
                                  kernels=["_add_ln_bwd_kernel", "_ln_grad_reduce_kernel"])
    assert layernorm.bwd_programs(R, D) == (3, 4)
    assert probe.launches[1].loaded == 2 * 3 * D * 4  # the partials a tensor-level count misses


# ---- C++ / CUDA ops ---------------------------------------------------------------------------

def _function_body(source: str, name: str) -> str:
    start = source.index(name)
    depth, i = 0, source.index("{", start)
    for j in range(i, len(source)):
        depth += {"{": 1, "}": -1}.get(source[j], 0)
        if depth == 0:
            return source[i:j]
    raise AssertionError(name)


def test_cuda_launch_sites_match_the_charged_launches():
    cu = (ROOT / "csrc/cuda/unshuffle_kernels.cu").read_text()
    assert _function_body(cu, "void forward_typed").count("<<<") == 1
    assert _function_body(cu, "void backward_typed").count("<<<") == 2  # rows + reduce_partials
    masking = (ROOT / "csrc/cuda/masking_kernels.cu").read_text()
    assert _function_body(masking, "void launch_random_masking").count("<<<") == 1
    header = (ROOT / "csrc/unshuffle_index.h").read_text()
    rows = int(re.search(r"kRowsPerChunk = (\d+);", header).group(1))
    assert rows == accounting.UNSHUFFLE_ROWS_PER_CHUNK
    # the backward's workspace: (N, chunks, D) in the op-math type, written then reduced
    assert "at::empty({dims.N, num_chunks(dims), dims.D}" in (ROOT / "csrc/unshuffle.cpp").read_text()


@pytest.mark.skipif(not _ext.has_op("unshuffle_scatter"), reason="mae_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unshuffle_charges(dtype):
    """forward_kernel reads every kept row of x once (ids_restore is a permutation), the mask
    token, ids_restore and the pos table, writes out; backward_rows_kernel reads grad_out and
    ids_restore, writes grad_x and the fp32 partials, reduce_partials_kernel reads the partials
    and writes grad_mask_token."""
    N, L, K, D = 3, 70, 17, 24  # 3 chunks of 32 rows
    x, mask_token = torch.randn(N, 1 + K, D).to(dtype), torch.randn(1, 1, D).to(dtype)
    pos = torch.randn(1, 1 + L, D).to(dtype)
    ids_restore = torch.argsort(torch.rand(N, L), dim=1)
    counter = TrafficCounter()
    with counter:
        out = torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos)
        torch.ops.mae_fast.unshuffle_scatter_backward(out, ids_restore, K)
    fwd, bwd = counter.log
    e = x.element_size()
    # every x row is the source of exactly one output row (the CPU twin: same index header)
    sources = {int(r) for r in ids_restore.flatten() if r < K}
    assert len(sources) == K
    assert (fwd.read, fwd.written, fwd.launches) == (
        N * (1 + K) * D * e + D * e + N * L * 8 + (1 + L) * D * e, N * (1 + L) * D * e, 1)
    partial = N * math.ceil(L / 32) * D * 4
    assert (bwd.read, bwd.written, bwd.launches) == (
        N * (1 + L) * D * e + N * L * 8 + partial, N * (1 + K) * D * e + partial + D * e, 2)


@pytest.mark.skipif(not _ext.has_op("unshuffle_scatter"), reason="mae_fast._C not built")
def test_unshuffle_charges_decoder_masking():
    """len_decode = M: forward reads every x row, ids_restore, and the pos rows of cls + the
    patches some sample decodes, writes (N, 1+K+M, D); backward reads the (N, 1+K+M, D)
    grad_out, with the same chunks of source slots as the official layout."""
    N, L, K, M, D = 3, 70, 17, 9, 24
    x, mask_token, pos = torch.randn(N, 1 + K, D), torch.randn(1, 1, D), torch.randn(1, 1 + L, D)
    ids_restore = torch.argsort(torch.rand(N, L), dim=1)
    counter = TrafficCounter()
    with counter:
        out = torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos, M)
        torch.ops.mae_fast.unshuffle_scatter_backward(out, ids_restore, K, M)
    fwd, bwd = counter.log
    decoded_patches = {l for n in range(N) for l in range(L) if ids_restore[n, l] < K + M}
    assert len(decoded_patches) < L  # some patch is dropped by every sample: fewer pos rows read
    assert (fwd.read, fwd.written, fwd.launches) == (
        N * (1 + K) * D * 4 + D * 4 + N * L * 8 + (1 + len(decoded_patches)) * D * 4, N * (1 + K + M) * D * 4, 1)
    partial = N * math.ceil(L / 32) * D * 4
    assert (bwd.read, bwd.written, bwd.launches) == (
        N * (1 + K + M) * D * 4 + N * L * 8 + partial, N * (1 + K) * D * 4 + partial + D * 4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_loss_rows_charges(dtype):
    """Decoder-side masking's loss: forward reads row_ids and every row's pred + pixels (pred a
    strided view), reduces without a mask; backward zero-fills grad_imgs when wanted."""
    from mae_fast.ops.loss import masked_loss_rows_backward, masked_loss_rows_op
    N, C, H, W, p = 2, 3, 8, 12, 4
    P, K, M = C * p * p, 2, 3
    imgs = torch.randn(N, C, H, W).to(dtype)
    pred_rows = torch.randn(N, 1 + K + M, P).to(dtype)[:, 1 + K:, :]
    row_ids = torch.tensor([[4, 0, 2], [1, 5, 3]])
    probe = assert_charge_is_real(masked_loss_rows_op, imgs, pred_rows, row_ids, p, True,
                                  kernels=["_masked_loss_fwd_kernel", "_masked_loss_reduce_kernel"])
    e = imgs.element_size()
    assert probe.launches[0].loaded == N * M * 8 + N * M * P * 2 * e
    assert probe.launches[1].loaded == N * M * 4  # no mask read
    loss, count = masked_loss_rows_op(imgs, pred_rows, row_ids, p, True)
    for want_imgs in (False, True):
        assert_charge_is_real(masked_loss_rows_backward, torch.ones((), dtype=loss.dtype), imgs, pred_rows,
                              row_ids, count, p, True, want_imgs, kernels=["_masked_loss_bwd_kernel"])


@pytest.mark.skipif(not _ext.has_op("random_masking"), reason="mae_fast._C not built")
def test_random_masking_charge():
    noise = torch.rand(3, 50)
    counter = TrafficCounter()
    with counter:
        torch.ops.mae_fast.random_masking(noise, 12)
    (rec,) = counter.log
    assert (rec.read, rec.written, rec.launches) == (3 * 50 * 4, 3 * 12 * 8 + 3 * 50 * 8 + 3 * 50 * 4, 1)


def test_every_custom_op_has_a_charge():
    """A new mae_fast op must say what its kernels move."""
    import mae_fast.ops  # noqa: F401  (registers the Python ops)
    names = set()
    for name in dir(torch.ops.mae_fast):
        packet = getattr(torch.ops.mae_fast, name)
        if hasattr(packet, "overloads") and not name.startswith("_"):
            names.add(f"mae_fast::{name}")
    assert names, "no mae_fast ops registered"
    assert names <= set(accounting.KERNEL_CHARGES), names - set(accounting.KERNEL_CHARGES)
