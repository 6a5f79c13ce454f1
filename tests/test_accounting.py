"""The meta-tensor byte/launch counter (mae_fast.accounting), checked on cases whose bytes are
worked out by hand here, and the table on a tiny model."""
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


def test_fused_attention_counted_once_per_direction():
    """A fused backend on meta is counted as a flash kernel: forward q, k, v, out (bf16) + fp32
    lse; backward q, k, v, out, dout, lse -> dq, dk, dv. B=2, M=5, C=8, H=2."""
    from mae_fast import attention

    B, M, C, H = 2, 5, 8, 2
    qkv = meta(B, M, 3 * C, dtype=torch.bfloat16, requires_grad=True)
    tok, lse = B * M * C * 2, B * H * M * 4
    original = attention.attend
    c = TrafficCounter()
    with accounting.instrument_mae(c), c:
        out = attention.attend(qkv, H, (C // H) ** -0.5, backend="sdpa")
        c.phase = "bwd"
        out.sum().backward()
    assert out.shape == (B, M, C)
    f, b = c.tally[("fwd", "attention")], c.tally[("bwd", "attention")]
    assert (f.bytes, f.ops) == (4 * tok + lse, 1)
    assert (b.bytes, b.ops) == (8 * tok + lse, 1)
    assert attention.attend is original  # instrument_mae put everything back


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
    # the transformer body is the same ops on both paths
    assert fast.total(("rest",)).bytes == official.total(("rest",)).bytes
    assert fast.total(GLUE).bytes < official.total(GLUE).bytes
    assert fast.total(GLUE).ops < official.total(GLUE).ops
    # floor: image 3*3*32*32*2 + tokens; the fused glue cannot beat it
    assert floor.terms[0][1] == 3 * 3 * 32 * 32 * 2
    assert fast.total(GLUE).bytes >= floor.bytes
    for region in REGIONS:
        assert fast.total((region,)).ops >= 0
    text = accounting.table(TINY, 3, "bf16", fast_backend)
    assert "glue total" in text and "step total" in text
