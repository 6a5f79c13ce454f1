"""The meta-tensor byte/launch counter (mae_fast.accounting), checked on cases whose bytes are
worked out by hand here, and the table on a tiny model."""
import collections
import functools

import pytest
import torch

from mae_fast import accounting, reference
from mae_fast.accounting import GLUE, REGIONS, TrafficCounter, tensor_bytes
from mae_fast.model import MaskedAutoencoderViT

META = "meta"


def meta(*shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(*shape, device=META, dtype=dtype, requires_grad=requires_grad)


def test_tensor_bytes_counts_distinct_elements():
    assert tensor_bytes(meta(4, 8)) == 4 * 8 * 4
    assert tensor_bytes(meta(4, 8, dtype=torch.bfloat16)) == 4 * 8 * 2
    assert tensor_bytes(meta(1, 8).expand(4, 8)) == 8 * 4  # a broadcast row is read once
    assert tensor_bytes(meta(4, 8).t()) == 4 * 8 * 4
    assert tensor_bytes(meta(0, 8)) == 0


def test_one_add_reads_two_writes_one():
    a, b = meta(4, 8), meta(4, 8)
    with TrafficCounter() as c:
        a + b
    t = c.total()
    assert (t.bytes, t.ops) == (3 * 4 * 8 * 4, 1)


def test_views_move_nothing_and_broadcast_reads_once():
    a, row = meta(4, 8, dtype=torch.float16), meta(1, 8, dtype=torch.float16)
    with TrafficCounter() as c:
        v = a.view(8, 4).t().transpose(0, 1).reshape(4, 8)  # views only
        v + row.expand(4, 8)  # reads a (64 B) + one row (16 B), writes 64 B
    t = c.total()
    assert (t.bytes, t.ops) == (64 + 16 + 64, 1)


def test_official_decoder_input_bytes_by_hand():
    """reference.unshuffle = repeat, cat, repeat (index), gather, cat, add; fp32 (N=2, L=4,
    K=1, D=8), bytes worked out op by op:
      repeat mask_token (1,1,8) -> (2,3,8):          32 + 192        = 224
      cat [x[:,1:] (2,1,8), mask_tokens (2,3,8)]:    64 + 192 + 256  = 512
      repeat ids (2,4,1) int64 -> (2,4,8) int64:     64 + 512        = 576
      gather x_ (2,4,8), index (2,4,8) int64:        256 + 512 + 256 = 1024
      cat [x[:,:1] (2,1,8), x_ (2,4,8)] -> (2,5,8):  64 + 256 + 320  = 640
      add pos (1,5,8):                               320 + 160 + 320 = 800
    """
    x, mask_token, pos = meta(2, 2, 8), meta(1, 1, 8), meta(1, 5, 8)
    ids_restore = torch.empty(2, 4, device=META, dtype=torch.int64)
    with TrafficCounter(keep_log=True) as c:
        out = reference.unshuffle(x, mask_token, ids_restore, pos)
    assert out.shape == (2, 5, 8)
    assert [r.op for r in c.log] == ["aten::repeat", "aten::cat", "aten::repeat", "aten::gather",
                                     "aten::cat", "aten::add.Tensor"]
    assert [r.read + r.written for r in c.log] == [224, 512, 576, 1024, 640, 800]
    assert c.total().bytes == 3776


def test_backward_ops_belong_to_the_region_that_made_them():
    w = meta(4, 8, requires_grad=True)
    x = meta(4, 8)
    c = TrafficCounter()
    with c:
        with c.region("loss"):
            y = x * w  # fwd: 3 * 128 B
        z = y.sum()  # rest, fwd: 128 + 4 B
        c.phase = "bwd"
        z.backward()
    fwd_loss = c.tally[("fwd", "loss")]
    assert (fwd_loss.bytes, fwd_loss.ops) == (3 * 128, 1)
    # MulBackward: grad * x -> grad_w, one op in "loss". SumBackward hands it the scalar seed
    # expanded to (4, 8) (stride 0: 4 B read), x is 128 B, grad_w 128 B written
    bwd_loss = c.tally[("bwd", "loss")]
    assert (bwd_loss.bytes, bwd_loss.ops) == (4 + 128 + 128, 1)
    assert c.tally[("fwd", "rest")].ops == 1
    assert c.tally[("bwd", "rest")].ops >= 1  # the seed gradient (ones_like), outside the region


def test_fused_attention_kernel_once_and_the_copies_around_it_op_by_op():
    """A fused backend on meta: the kernel is charged as PyTorch's FlashAttention-2 moves it,
    everything autograd runs around it at the aten level. B=2, M=5, C=8, H=2, bf16:
    tok = B*M*C*2 = 160 B, row (fp32 (B, H, M)) = 80 B, acc (fp32 dq accumulator) = 320 B.
      forward  flash_fwd: q, k, v (480) -> out (160) + lse (80)                       = 720, 1 op
               (out is (B, M, H, K) memory: the head merge after it is a view)
      backward flash_bwd_dot_do_o: out, dout (320) -> D (80) + cleared acc (320)       = 720
               flash_bwd: q, k, v, dout (640), lse, D (160), acc (320) -> dk, dv (320) + acc (320)
                                                                                       = 1760
               flash_bwd_convert_dq: acc (320) -> dq (160)                               = 480
               merge dq, dk, dv into d(qkv): stack (480 -> 480) and the reshape's copy
               (480 -> 480)                                                             = 1920
               5 ops, 4880 B."""
    from mae_fast import attention

    B, M, C, H = 2, 5, 8, 2
    qkv = meta(B, M, 3 * C, dtype=torch.bfloat16, requires_grad=True)
    original = attention.attend
    c = TrafficCounter()
    with accounting.instrument_mae(c), c:
        out = attention.attend(qkv, H, (C // H) ** -0.5, backend="sdpa")
        c.phase = "bwd"
        out.backward(torch.empty_like(out))
    assert out.shape == (B, M, C)
    f, b = c.tally[("fwd", "attention")], c.tally[("bwd", "attention")]
    assert (f.bytes, f.ops) == (720, 1)
    assert (b.bytes, b.ops) == (4880, 5)
    bwd_ops = [(r.op.split(": ")[-1], r.read + r.written) for r in c.log if r.phase == "bwd"]
    assert bwd_ops == [("flash_bwd_dot_do_o", 720), ("flash_bwd", 1760), ("flash_bwd_convert_dq", 480),
                       ("aten::stack", 960), ("aten::clone", 960)]
    # flash_attention_bytes (one kernel each way) plus what FA2's backward adds: dout read twice
    # (160), D written and read (2 * 80), the fp32 dq accumulator cleared, read, written, read
    fwd_kernel, bwd_kernel = accounting.flash_attention_bytes(B, M, C, H, 2)
    assert f.bytes == fwd_kernel and 720 + 1760 + 480 == bwd_kernel + 160 + 2 * 80 + 4 * 320
    # FLOPs: torch's own SDPA formulas, forward 2 matmuls, backward 5 (the scores recomputed)
    K = C // H
    assert f.flops == 2 * (2 * B * H * M * M * K)
    assert b.flops == 5 * (2 * B * H * M * M * K)
    assert attention.attend is original  # instrument_mae put everything back
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != "mae_fast.accounting"


def test_fills_write_only_and_allocations_move_nothing():
    a = meta(4, 8)
    with TrafficCounter() as c:
        torch.empty(4, 8, device=META)  # an allocation: no kernel
        a.zero_()  # writes 128 B, reads nothing
        a.fill_(1.0)
    assert [(r.op, r.read, r.written) for r in c.log] == [("aten::zero_", 0, 128), ("aten::fill_.Scalar", 0, 128)]


def test_multi_tensor_apply_launches():
    """PyTorch's multi-tensor-apply: at most 110 / 64 / 48 / 36 tensors (1-4 lists) and 320
    chunks of 65536 elements per launch."""
    small = [meta(10) for _ in range(200)]
    assert accounting.multi_tensor_launches([small]) == 2  # 110 + 90
    assert accounting.multi_tensor_launches([small] * 4) == 6  # ceil(200 / 36)
    big = [meta(65536 * 400)]  # 400 chunks: 320 + 80
    assert accounting.multi_tensor_launches([big]) == 2
    with TrafficCounter() as c:
        torch._foreach_mul_(small, 2.0)
    assert c.log[0].launches == 2 and c.log[0].bytes == 2 * 200 * 40


def test_flops_from_torch_formulas():
    a, b = meta(3, 5, dtype=torch.bfloat16), meta(5, 7, dtype=torch.bfloat16)
    with TrafficCounter() as c:
        a @ b
        a + a
    assert [r.flops for r in c.log] == [2 * 3 * 5 * 7, 0]


def test_patch_embed_gemm_flop_formula():
    """The one custom op doing matmul work registers its FLOPs: 2 N K D Cpp each way."""
    from torch.utils.flop_counter import FlopCounterMode
    from mae_fast.ops.patch_embed import patch_embed_gemm, patch_embed_gemm_backward
    N, C, H, W, p, D, K = 2, 3, 16, 16, 4, 32, 5
    args = (meta(N, C, H, W), meta(D, C, p, p), meta(D), meta(1, 1 + 16, D), meta(1, 1, D),
            torch.zeros(N, K, dtype=torch.long, device=META), torch.float32)
    with FlopCounterMode(display=False) as fc:
        patch_embed_gemm(*args)
        patch_embed_gemm_backward(meta(N, 1 + K, D), args[0], args[5], [D, C, p, p], torch.float32,
                                  torch.float32, torch.float32, torch.float32)
    assert fc.get_total_flops() == 2 * (2 * N * K * D * C * p * p)


TINY = functools.partial(MaskedAutoencoderViT, img_size=32, patch_size=8, in_chans=3, embed_dim=32,
                         depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                         decoder_num_heads=2, mlp_ratio=2.0)


@pytest.mark.parametrize("fast_backend", ["fast", "auto"])
def test_tiny_model_step(fast_backend):
    from mae_fast.backends import choose
    for op in ("patch_embed_masked", "unshuffle", "masked_loss"):
        try:
            choose(op, META, "fast")
        except RuntimeError as e:
            pytest.skip(f"no fused {op} on meta here: {e}")
    results, floor = accounting.measure(TINY, batch=3, dtype=torch.bfloat16, fast_backend=fast_backend)
    fast, official = results["mae_fast"], results["official op sequence"]
    # the official encoder input, forward, is models_mae.py's op sequence
    official_enc = [(r.op) for r in accounting.count_step(
        accounting.build_meta_model(TINY, "reference", torch.bfloat16), 3, keep_log=True).log
        if r.phase == "fwd" and r.region == "encoder input"]
    assert official_enc == ["aten::convolution", "aten::add.Tensor", "aten::repeat", "aten::gather",
                            "aten::add.Tensor", "aten::cat"]
    # each fused glue region runs a mae_fast custom op forward (its fake impl on meta)
    log = accounting.count_step(accounting.build_meta_model(TINY, fast_backend, torch.bfloat16), 3,
                                keep_log=True).log
    for region in ("encoder input", "decoder input", "loss"):
        fused = [r.op for r in log if r.phase == "fwd" and r.region == region]
        assert any(op.startswith("mae_fast::") for op in fused), (region, fused)
    # the transformer body is the same ops on both paths; they may differ only in how the
    # gradient of pred = x[:, 1:] is handed back (torch 2.11 adds a copy_ of it on the official
    # path, whose loss backward leaves a differently laid-out gradient)
    handoff = {"aten::copy_", "aten::slice_backward"}

    # ... and the residual adds + LayerNorms, which mae_fast's fused blocks run as add_layer_norm
    norms = {"aten::add", "aten::native_layer_norm", "aten::native_layer_norm_backward",
             "mae_fast::add_layer_norm", "mae_fast::add_layer_norm_backward"}

    def body(counter):
        return collections.Counter((r.phase, r.op, r.bytes) for r in counter.log
                                   if r.region == "rest" and r.op.split(".")[0] not in handoff | norms)

    assert body(fast) == body(official)
    # per block stack of depth d: 2d + 1 fused add + LayerNorm calls (norm1, norm2, final norm),
    # each with its backward; no plain LayerNorm left
    for phase, op in (("fwd", "mae_fast::add_layer_norm"), ("bwd", "mae_fast::add_layer_norm_backward")):
        assert sum(r.phase == phase and r.op == op for r in fast.log) == (2 * 2 + 1) + (2 * 1 + 1)
    assert not [r for r in fast.log if "native_layer_norm" in r.op]
    assert sum(r.op.startswith("aten::native_layer_norm") for r in official.log) == 2 * 8
    N, L, P = 3, 16, 3 * 8 * 8
    for counter in (fast, official):
        extra = [r for r in counter.log if r.region == "rest" and r.op.split(".")[0] in handoff]
        assert all(r.bytes <= 2 * N * (1 + L) * P * 2 for r in extra), extra
    assert fast.total(GLUE).bytes < official.total(GLUE).bytes
    assert fast.total(GLUE).ops < official.total(GLUE).ops
    # floor: image 3*3*32*32*2 + tokens; the fused glue cannot beat it
    assert floor.terms[0][1] == 3 * 3 * 32 * 32 * 2
    assert fast.total(GLUE).bytes >= floor.bytes
    for region in REGIONS:
        assert fast.total((region,)).ops >= 0
    text = accounting.table(TINY, 3, "bf16", fast_backend)
    assert "glue total" in text and "step total" in text


def test_adamw_step_is_counted_once_per_parameter_tensor():
    """The fused AdamW step reads param, grad, exp_avg, exp_avg_sq (+ the fp32 step count) and
    writes param, exp_avg, exp_avg_sq: 7 tensor passes per parameter, in multi-tensor-apply
    launches of 4 lists (48 tensors here: 36 + 12, 2 launches); foreach takes more."""
    mae = accounting.build_meta_model(TINY, "reference", torch.bfloat16)
    params = [p for p in mae.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * 2 for p in params)
    fused = accounting.count_step(mae, 3, optimizer="fused")
    opt = fused.total(("optimizer",))
    assert opt.bytes == 7 * param_bytes + 4 * len(params)
    assert opt.ops == accounting.multi_tensor_launches([params] * 4) == 2
    mae = accounting.build_meta_model(TINY, "reference", torch.bfloat16)
    foreach = accounting.count_step(mae, 3, optimizer="foreach").total(("optimizer",))
    assert foreach.bytes > opt.bytes and foreach.ops > opt.ops
    assert fused.total(("attention", "rest"), ("fwd", "bwd")).bytes == \
        accounting.count_step(accounting.build_meta_model(TINY, "reference", torch.bfloat16), 3) \
        .total(("attention", "rest"), ("fwd", "bwd")).bytes  # the optimizer adds, changes nothing else


def test_meta_autocast_casts_like_cuda_autocast():
    """bf16 autocast on meta: a Linear runs in bf16 on fp32 master weights (the casts are ops),
    LayerNorm runs in fp32, and the fp32 residual + bf16 output promotes to fp32."""
    lin, ln = torch.nn.Linear(8, 4, device=META), torch.nn.LayerNorm(8, device=META)
    x = meta(2, 8, requires_grad=True)
    with TrafficCounter() as c, accounting.MetaAutocast(torch.bfloat16):
        h = ln(x.to(torch.bfloat16))
        y = lin(h)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert [r.op for r in c.log if r.op == "aten::_to_copy"].count("aten::_to_copy") >= 3
    assert [r.op for r in c.log].count("aten::addmm") == 1


def test_hf_vitmae_contender_flops_match_mae_fast():
    """HF ViTMAE (transformers, SDPA) as the third contender: the same model math, so the same
    FLOPs up to the patch embedding, which HF runs on all L patches and mae_fast on the K kept
    ones: the difference is exactly 2 x 2 N (L - K) D C p p (forward + weight gradient), and
    within 1 % of the step on this config."""
    pytest.importorskip("transformers")
    small = functools.partial(MaskedAutoencoderViT, img_size=32, patch_size=4, in_chans=3,
                              embed_dim=128, depth=8, num_heads=4, decoder_embed_dim=64,
                              decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)
    N, mask_ratio = 2, 0.75
    results, _ = accounting.measure(small, N, torch.bfloat16, "fast", mask_ratio, optimizer="fused",
                                    hf=True)
    fast, hf = results["mae_fast"].total(), results["HF ViTMAE (sdpa)"].total()
    L, D, P = 64, 128, 3 * 4 * 4
    K = reference.num_keep(L, mask_ratio)
    assert hf.flops - fast.flops == 2 * (2 * N * (L - K) * D * P)
    assert abs(fast.flops - hf.flops) / hf.flops < 0.01
    # HF's attention region: its head transposes are views, so only the flash kernels
    hf_attention_ops = {r.op.split(": ")[-1] for r in results["HF ViTMAE (sdpa)"].log
                        if r.region == "attention"}
    assert hf_attention_ops == {"flash_fwd", "flash_bwd_dot_do_o", "flash_bwd", "flash_bwd_convert_dq"}
    text = accounting.roofline_table(small, N, "bf16", mask_ratio=mask_ratio)
    assert "ESTIMATE" in text and "HF ViTMAE (sdpa)" in text
