"""Decoder-side masking (``decoder_mask_ratio``, issue 16 part 2): the reference's semantics
checked against the official decoder input, the ``len_decode`` index path of the C++/CUDA
unshuffle op and the ``ROW_IDS`` path of the Triton masked loss against the reference (forward
and backward, odd shapes, every dtype), and the model: ratio 0 is the official path bit for bit,
ratio > 0 with the fast ops equals the reference backend. Tiny shapes: the interpreter is slow."""
import pytest
import torch

from mae_fast import _ext, ops, reference
from mae_fast.model import MaskedAutoencoderViT
from mae_fast.ops import patch_embed as pe
from _lane import lane_device

requires_ext = pytest.mark.skipif(not _ext.has_op("unshuffle_scatter"),
                                  reason=f"mae_fast._C not built: {_ext.LOAD_ERROR}")
requires_triton = pytest.mark.skipif(not pe._triton_runs(lane_device()),
                                     reason="needs triton importable (and TRITON_INTERPRET=1 on CPU)")


def _ids_restore(N, L, device=None):
    return torch.argsort(torch.argsort(torch.rand(N, L), dim=1), dim=1).to(device)


# ------------------------------------------------------------------------------------------------
# the reference: what decoder-side masking means
def test_decoder_ids_are_the_visible_then_the_first_masked_in_noise_order():
    N, L, K, M = 3, 20, 5, 7
    noise = torch.rand(N, L)
    ids_keep, ids_restore, mask = reference.masking_indices(noise, K)
    ids_decode = reference.decoder_ids(ids_restore, K, M)
    assert ids_decode.shape == (N, K + M)
    assert torch.equal(ids_decode[:, :K], ids_keep)
    decoded = ids_decode[:, K:]
    assert torch.all(torch.gather(mask, 1, decoded) == 1)  # only masked patches are decoded
    # the decoded ones are the M masked patches with the smallest noise
    masked_noise = noise.masked_fill(mask == 0, float("inf"))
    assert torch.equal(decoded, torch.argsort(masked_noise, dim=1)[:, :M])


def test_num_decode_rounds_like_num_keep():
    assert reference.num_decode(147, 0.0) == 147
    assert reference.num_decode(147, 0.5) == 73
    assert reference.num_decode(147, 0.75) == 36


@pytest.mark.parametrize("with_pos", [True, False])
def test_reference_subset_is_the_official_decoder_input_at_the_decoded_patches(with_pos):
    N, L, K, M, D = 2, 11, 3, 4, 5
    x, mask_token = torch.randn(N, 1 + K, D), torch.randn(1, 1, D)
    pos = torch.randn(1, 1 + L, D) if with_pos else None
    ids_restore = _ids_restore(N, L)
    full = reference.unshuffle(x, mask_token, ids_restore, pos)  # (N, 1+L, D), patch order
    ids_decode = reference.decoder_ids(ids_restore, K, M)
    rows = torch.cat([torch.zeros(N, 1, dtype=torch.long), 1 + ids_decode], dim=1)
    expected = torch.gather(full, 1, rows.unsqueeze(-1).expand(-1, -1, D))
    got = reference.unshuffle_subset(x, mask_token, ids_restore, M, pos)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reference_subset_loss_is_the_official_loss_with_the_decoded_mask():
    N, C, H, W, p = 2, 3, 8, 12, 4
    L, P, K, M = (H // p) * (W // p), C * p * p, 2, 3
    imgs, pred = torch.randn(N, C, H, W, dtype=torch.float64), torch.randn(N, L, P, dtype=torch.float64)
    ids_decoded = reference.decoder_ids(_ids_restore(N, L), K, M)[:, K:]
    decoded_mask = torch.zeros(N, L, dtype=torch.float64).scatter(1, ids_decoded, 1.0)
    pred_rows = torch.gather(pred, 1, ids_decoded.unsqueeze(-1).expand(-1, -1, P))
    for norm_pix in (False, True):
        torch.testing.assert_close(reference.masked_loss_subset(imgs, pred_rows, ids_decoded, p, norm_pix),
                                   reference.masked_loss(imgs, pred, decoded_mask, p, norm_pix))


# ------------------------------------------------------------------------------------------------
# the unshuffle op's len_decode path (C++ CPU twin; CUDA in the CUDA lane)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _unshuffle_case(N, L, K, M, D, dtype, with_pos):
    x = torch.randn(N, 1 + K, D, dtype=torch.float64).to(dtype)
    mask_token = torch.randn(1, 1, D, dtype=torch.float64).to(dtype)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64).to(dtype) if with_pos else None
    grad_out = torch.randn(N, 1 + K + M, D, dtype=torch.float64).to(dtype)
    return x, mask_token, _ids_restore(N, L, x.device), pos, grad_out


def _with_grads(fn, x, mask_token, ids_restore, M, pos, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, mask_token, pos)]
    out = fn(leaves[0], leaves[1], ids_restore, M, leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _op(x, mask_token, ids_restore, M, pos):
    return torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos, M)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,L,K,M,D,with_pos", [(3, 7, 2, 3, 5, True), (2, 40, 10, 1, 17, True),
                                                (1, 6, 0, 6, 8, False), (2, 9, 4, 0, 3, True),
                                                (4, 49, 12, 18, 24, False)])
def test_op_matches_reference(N, L, K, M, D, with_pos, dtype, device):
    x, mask_token, ids_restore, pos, grad_out = _unshuffle_case(N, L, K, M, D, dtype, with_pos)
    out, grads = _with_grads(_op, x, mask_token, ids_restore, M, pos, grad_out)
    out_ref, grads_ref = _with_grads(reference.unshuffle_subset, x, mask_token, ids_restore, M, pos, grad_out)
    assert out.shape == (N, 1 + K + M, D) and out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # bit-exact: the same adds
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=0, atol=0)  # grad_x: rows copied
    # grad_mask_token: a sum of N*M rows, accumulated in fp32 (fp64) and rounded once
    expected = grad_out[:, 1 + K:].double().sum(dim=(0, 1)).view(1, 1, -1)
    tol = torch.finfo(dtype).eps * (1 + expected.abs().max().item()) + N * M * 1e-6 * grad_out.double().abs().max().item()
    torch.testing.assert_close(grads[1].double(), expected, rtol=0, atol=tol)
    if with_pos:
        torch.testing.assert_close(grads[2], grads_ref[2], rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6,
                                   atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)


@requires_ext
def test_op_gradcheck_and_opcheck(device):
    x, mask_token, ids_restore, pos, _ = _unshuffle_case(2, 9, 3, 4, 4, torch.float64, True)
    inputs = [x.requires_grad_(), mask_token.requires_grad_(), pos.requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, b, c: _op(a, b, ids_restore, 4, c), inputs)
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_scatter.default, (x, mask_token, ids_restore, pos, 4))
    grad_out = torch.randn(2, 1 + 3 + 4, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mae_fast.unshuffle_scatter_backward.default, (grad_out, ids_restore, 3, 4))


@requires_ext
def test_op_ratio_zero_layout_is_unchanged_by_default_argument():
    """len_decode = -1 (the schema default) is the official op: same bits as leaving it out."""
    x, mask_token, ids_restore, pos, _ = _unshuffle_case(2, 9, 3, 6, 4, torch.float32, True)
    torch.testing.assert_close(torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos, -1),
                               reference.unshuffle(x, mask_token, ids_restore, pos), rtol=0, atol=0)


@requires_ext
@pytest.mark.parametrize("len_decode,match", [(5, "len_decode = 5"), (-2, "len_decode = -2")])
def test_op_bad_len_decode_raises_clearly(len_decode, match):
    x, mask_token, ids_restore, pos, _ = _unshuffle_case(2, 6, 2, 1, 4, torch.float32, True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mae_fast.unshuffle_scatter(x, mask_token, ids_restore, pos, len_decode)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mae_fast.unshuffle_scatter_backward(torch.randn(2, 9, 4), ids_restore, 2, len_decode)
    with pytest.raises(ValueError, match="len_decode"):
        ops.unshuffle_subset(x, mask_token, ids_restore, len_decode, pos)


@requires_ext
def test_op_backward_rejects_a_grad_out_of_the_wrong_length():
    with pytest.raises(RuntimeError, match=r"expected 1\+len_keep\+len_decode = 6"):
        torch.ops.mae_fast.unshuffle_scatter_backward(torch.randn(2, 7, 4), _ids_restore(2, 6), 2, 3)


# ------------------------------------------------------------------------------------------------
# the Triton masked loss's ROW_IDS path (interpreter on CPU; compiled in the CUDA lane)
def _loss_case(N, C, H, W, p, K, M, dtype, channels_last=False):
    L, P = (H // p) * (W // p), C * p * p
    imgs = torch.randn(N, C, H, W).to(dtype)
    if channels_last:
        imgs = imgs.to(memory_format=torch.channels_last)
    # pred rows as the model has them: decoder_pred(x)[:, 1 + K:, :], a strided view
    pred_all = torch.randn(N, 1 + K + M, P).to(dtype)
    ids_rows = reference.decoder_ids(_ids_restore(N, L, imgs.device), K, M)[:, K:]
    return imgs.requires_grad_(), pred_all.requires_grad_(), ids_rows


def _loss_grads(fn, imgs, pred_all, ids_rows, K, p, norm_pix):
    loss = fn(imgs, pred_all[:, 1 + K:, :], ids_rows, p, norm_pix)
    return (loss, *torch.autograd.grad(loss, [imgs, pred_all]))


@requires_triton
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p,C,HW,N,K,M,channels_last", [(4, 3, (8, 12), 2, 1, 3, False),
                                                        (14, 1, (28, 14), 1, 1, 1, False),
                                                        (4, 3, (12, 8), 3, 2, 2, True)])
def test_loss_rows_matches_reference(p, C, HW, N, K, M, channels_last, dtype, norm_pix, device):
    imgs, pred_all, ids_rows = _loss_case(N, C, *HW, p, K, M, dtype, channels_last)

    def fast(*a):
        return ops.masked_loss_rows(*a, backend="fast")

    got = _loss_grads(fast, imgs, pred_all, ids_rows, K, p, norm_pix)
    if dtype == torch.float32:
        want = _loss_grads(reference.masked_loss_subset, imgs, pred_all, ids_rows, K, p, norm_pix)
        tol = dict(rtol=1e-5, atol=1e-5)
    else:  # against the fp32 reference, with a half-precision tolerance
        i32, p32 = imgs.detach().float().requires_grad_(), pred_all.detach().float().requires_grad_()
        want = _loss_grads(reference.masked_loss_subset, i32, p32, ids_rows, K, p, norm_pix)
        tol = dict(rtol=2e-2, atol=2e-2 * max(1.0, want[0].abs().item()))
    assert got[0].dtype == torch.promote_types(dtype, dtype) and got[2].dtype == dtype
    for name, g, w in zip(("loss", "grad_imgs", "grad_pred"), got, want):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.float(), w.float(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m: f"{name}: {m}")
    # the visible rows (and cls) of pred_all get no gradient; pixels of undecoded patches neither
    assert torch.all(got[2][:, :1 + K] == 0)
    decoded = torch.zeros(N, (HW[0] // p) * (HW[1] // p), dtype=torch.bool).scatter(1, ids_rows.cpu(), True)
    grad_patches = reference.patchify(got[1].detach().float().cpu(), p)
    assert torch.all(grad_patches[~decoded] == 0)


@requires_triton
def test_loss_rows_opcheck(device):
    imgs, pred_all, ids_rows = _loss_case(2, 3, 8, 8, 4, 1, 2, torch.float32)
    pred_rows = pred_all.detach()[:, 2:, :].contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.mae_fast.masked_loss_rows.default, (imgs, pred_rows, ids_rows, 4, True))


@requires_triton
def test_loss_rows_official_path_unchanged():
    """The official masked loss (ROW_IDS off) gives the same bits before and after a ROW_IDS
    launch compiled the other variant (no shared state between the two)."""
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = reference.masking_indices(torch.rand(2, 4), 1)[2]
    before = ops.masked_loss(imgs, pred, mask, 4, True, backend="fast")
    ops.masked_loss_rows(imgs, pred[:, :2], torch.tensor([[0, 3], [2, 1]]), 4, True, backend="fast")
    assert torch.equal(ops.masked_loss(imgs, pred, mask, 4, True, backend="fast"), before)


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[0, 4], [1, 2]]), r"row_ids values must lie in \[0, 4\)"),
    (torch.tensor([[0, 0], [1, 2]]), "distinct"),
    (torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), "int64"),
    (torch.tensor([[0], [1]]), r"pred_rows must be \(2, 1, 48\)"),
])
def test_loss_rows_bad_input_raises_clearly(ids, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.masked_loss_rows(torch.randn(2, 3, 8, 8), torch.randn(2, 2, 48), ids, 4, False)


# ------------------------------------------------------------------------------------------------
# the model
TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)


def test_ratio_zero_is_the_official_model_bit_for_bit():
    torch.manual_seed(1)
    official = MaskedAutoencoderViT(**TINY)
    zero = MaskedAutoencoderViT(**TINY, decoder_mask_ratio=0.0)
    zero.load_state_dict(official.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for a, b in zip(official(imgs, 0.75, noise), zero(imgs, 0.75, noise)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_model_fast_ops_equal_the_reference_backend(norm_pix):
    torch.manual_seed(2)
    kw = dict(TINY, norm_pix_loss=norm_pix, decoder_mask_ratio=0.5)
    fast = MaskedAutoencoderViT(**kw, backend="auto", attn_backend="math")
    ref = MaskedAutoencoderViT(**kw, backend="reference")
    with torch.no_grad():
        fast.mask_token.normal_(std=0.02)
    ref.load_state_dict(fast.state_dict())
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, pred, mask = fast(imgs, 0.5, noise)
    loss_ref, pred_ref, mask_ref = ref(imgs, 0.5, noise)
    loss.backward()
    loss_ref.backward()
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(pred, pred_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    grads_ref = dict(ref.named_parameters())
    for name, prm in fast.named_parameters():
        if prm.requires_grad:
            torch.testing.assert_close(prm.grad, grads_ref[name].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
    assert fast.mask_token.grad.abs().max() > 0


def test_model_pred_rows_and_loss_follow_the_decoded_subset():
    torch.manual_seed(3)
    model = MaskedAutoencoderViT(**TINY, backend="reference", decoder_mask_ratio=0.75)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = model(imgs, 0.5, noise)  # K = 8 kept, 8 masked, M = int(8 * 0.25) = 2 decoded
    _, ids_restore, _ = reference.masking_indices(noise, 8)
    ids_decode = reference.decoder_ids(ids_restore, 8, 2)
    computed = torch.zeros(2, 16, dtype=torch.bool).scatter(1, ids_decode, True)
    assert pred.shape == (2, 16, 3 * 8 * 8)
    assert torch.all(pred[~computed] == 0) and torch.all(pred[computed].abs().sum(-1) > 0)
    decoded = torch.zeros(2, 16).scatter(1, ids_decode[:, 8:], 1.0)
    torch.testing.assert_close(loss, reference.masked_loss(imgs, pred, decoded, 8, False))
    # the same noise gives the same subset and numbers
    loss2, pred2, _ = model(imgs, 0.5, noise)
    assert torch.equal(loss, loss2) and torch.equal(pred, pred2)


@pytest.mark.parametrize("ratio,err", [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError), (True, TypeError)])
def test_bad_decoder_mask_ratio_raises(ratio, err):
    with pytest.raises(err, match="decoder_mask_ratio"):
        MaskedAutoencoderViT(**TINY, decoder_mask_ratio=ratio)


def test_a_ratio_that_decodes_nothing_raises():
    model = MaskedAutoencoderViT(**TINY, decoder_mask_ratio=0.9)
    model(torch.randn(1, 3, 32, 32), 0.75)  # 12 masked: int(12 * 0.1) = 1 decoded, fine
    with pytest.raises(ValueError, match="decodes none"):
        model(torch.randn(1, 3, 32, 32), 0.5)  # 8 masked: int(8 * 0.1) = 0


# ------------------------------------------------------------------------------------------------
# it says so when it is on
def test_info_and_pretrain_say_when_decoder_masking_is_on():
    from mae_fast import info, pretrain
    assert "decoder-side masking: off" in info.report()
    line = info.decoder_masking_line(0.5)
    assert "ON" in line and "73 of the 147 masked patches" in line  # ViT-B/16 at mask 0.75
    args = pretrain.build_parser().parse_args(["--decoder-mask-ratio", "0.5"])
    assert args.decoder_mask_ratio == 0.5
    assert pretrain.build_parser().parse_args([]).decoder_mask_ratio == 0.0
    with pytest.raises(pretrain.UsageError, match="--decoder-mask-ratio"):
        pretrain.resolve_args(pretrain.build_parser().parse_args(["--decoder-mask-ratio", "1.0"]))
