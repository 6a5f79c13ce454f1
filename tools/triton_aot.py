"""AOT-compile every Triton kernel of mae_fast for sm_80 / sm_90 / sm_100 without a GPU, and
report what ``ptxas -v`` says (registers, spills, shared memory) plus the count of 128-bit
global loads/stores in the PTX.

    .venv/bin/python tools/triton_aot.py                  # print the table
    .venv/bin/python tools/triton_aot.py --write-doc      # ... and write it into docs/TRITON.md

Importable: ``rows(archs=(80, 90, 100))`` returns one dict per (kernel config, arch), for the
benchmarks' kernel report. The kernels are compiled with exactly the arguments their launchers
pass: each launcher in ``mae_fast.kernels`` is run on ``meta`` tensors of a ViT-L/16 step
(batch 256, 224 px) with its kernels swapped for recorders, and each recorded launch is turned
into the signature / constexprs / divisibility hints the Triton JIT would specialise on (ints
equal to 1 become constexprs, ints divisible by 16 and pointers 16-byte aligned get
``tt.divisibility``). A pointer's alignment is its tensor's storage offset in bytes (allocations
themselves are aligned), so a slice such as the official ``pred[:, 1:, :]`` (8-byte aligned at
patch 14 in bf16) compiles the unaligned variant a real launch gets.

Under TRITON_INTERPRET=1 (the tests) Triton's ``@jit`` yields interpreter objects that cannot be
compiled, so ``rows()`` then reruns this file in a subprocess with the interpreter off.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

ARCHS = (80, 90, 100)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "TRITON.md")
BEGIN, END = "<!-- triton_aot table begin -->", "<!-- triton_aot table end -->"

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                    "bool": "i1"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, name, sink):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, grid, args, kwargs))


@contextmanager
def _recording(module, sink):
    names = [n for n in dir(module) if n.startswith("_") and n.endswith("_kernel")]
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(n, sink))
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def launches():
    """[(label, module, kernel name, args, kwargs)]: every kernel launch of one ViT-L/16 step
    (batch 256, 224 px, fp32 images, bf16 activations as under autocast), on meta tensors, plus
    the variants real launches compile: the other constexpr branches (no norm_pix_loss), patch
    14 (ViT-H/14: gather, loss forward and backward, the GEMM forward and backward), the
    official ``pred[:, 1:, :]`` slice (not 16-byte aligned at patch 14 in bf16), fp32
    activations (no autocast), the fp32 GEMM, and uint8 images normalised in the gather, the
    loss and the GEMM's prologues (NCHW / NHWC, fp32 / bf16 normalised pixels, patch 16 / 14)."""
    import torch
    from mae_fast.kernels import masked_loss, patch_embed_gemm, patch_gather

    meta = torch.device("meta")
    N, C, H, W, p, D = 256, 3, 224, 224, 16, 1024
    L, K, P = (H // p) * (W // p), 49, C * p * p
    imgs = torch.empty(N, C, H, W, device=meta)
    imgs_nhwc = imgs.to(memory_format=torch.channels_last)
    ids_keep = torch.empty(N, K, dtype=torch.long, device=meta)
    x = torch.empty(N, K, D, dtype=torch.bfloat16, device=meta)
    pos_embed, cls_token = torch.empty(1, 1 + L, D, device=meta), torch.empty(1, 1, D, device=meta)
    pred = torch.empty(N, L, P, dtype=torch.bfloat16, device=meta)
    mask = torch.empty(N, L, device=meta)
    loss, mask_sum = torch.empty((), device=meta), torch.empty((), device=meta)
    grad_loss = torch.empty((), device=meta)
    weight, bias = torch.empty(D, C, p, p, device=meta), torch.empty(D, device=meta)
    grad_tokens = torch.empty(N, 1 + K, D, device=meta)  # fp32 tokens: bf16 GEMM + fp32 pos
    L14 = (H // 14) * (W // 14)
    ids_keep14 = torch.empty(N, L14 // 4, dtype=torch.long, device=meta)
    pred14 = torch.empty(N, L14, C * 14 * 14, dtype=torch.bfloat16, device=meta)
    mask14 = torch.empty(N, L14, device=meta)
    # the official loss input: pred = decoder_pred(x)[:, 1:, :] (a view one row in)
    pred_slice = torch.empty(N, 1 + L, P, dtype=torch.bfloat16, device=meta)[:, 1:, :]
    pred14_slice = torch.empty(N, 1 + L14, C * 14 * 14, dtype=torch.bfloat16, device=meta)[:, 1:, :]
    pred14_fp32 = torch.empty(N, 1 + L14, C * 14 * 14, device=meta)[:, 1:, :]
    weight14 = torch.empty(D, C, 14, 14, device=meta)
    pos_embed14 = torch.empty(1, 1 + L14, D, device=meta)
    grad_tokens14 = torch.empty(N, 1 + L14 // 4, D, device=meta)
    # uint8 images, normalised inside the gather / the loss's target load (issue 15)
    imgs_u8 = torch.empty(N, C, H, W, dtype=torch.uint8, device=meta)
    imgs_u8_nhwc = imgs_u8.to(memory_format=torch.channels_last)
    pixel_norm = torch.empty(2, C, device=meta)  # mean row, std row
    # decoder-side masking (decoder_mask_ratio 0.5): the loss reads decoder_pred(x)[:, 1 + K:, :]
    # (M decoded rows; 16-byte aligned at patch 16, 8-byte at patch 14 in bf16) with row_ids (N, M)
    M = (L - K) // 2
    pred_rows = torch.empty(N, 1 + K + M, P, dtype=torch.bfloat16, device=meta)[:, 1 + K:, :]
    row_ids = torch.empty(N, M, dtype=torch.long, device=meta)
    K14 = L14 // 4
    M14 = (L14 - K14) // 2
    pred14_rows = torch.empty(N, 1 + K14 + M14, C * 14 * 14, dtype=torch.bfloat16, device=meta)[:, 1 + K14:, :]
    row_ids14 = torch.empty(N, M14, dtype=torch.long, device=meta)

    calls = [
        ("gather nchw", patch_gather, lambda: patch_gather.gather_patches(imgs, ids_keep, p)),
        ("gather nhwc", patch_gather, lambda: patch_gather.gather_patches(imgs_nhwc, ids_keep, p)),
        ("scatter nchw", patch_gather, lambda: patch_gather.scatter_patches(
            torch.empty(N, K, P, device=meta), ids_keep, p, torch.empty_like(imgs))),
        ("pos+cls D1024", patch_gather, lambda: patch_gather.add_pos_cls(
            x, pos_embed, cls_token, ids_keep, torch.float32)),
        ("pos+cls bwd D1024", patch_gather, lambda: patch_gather.add_pos_cls_backward(
            grad_tokens, torch.bfloat16, torch.float32)),
        ("loss fwd normpix", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred, mask, p, True, torch.float32)),
        ("loss bwd normpix", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred, mask, mask_sum, p, True, False)),
        ("loss bwd normpix+imgs", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred, mask, mask_sum, p, True, True)),
        ("loss fwd normpix nhwc", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs_nhwc, pred, mask, p, True, torch.float32)),
        ("loss bwd normpix+imgs nhwc", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs_nhwc, pred, mask, mask_sum, p, True, True)),
        ("loss fwd pix", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred, mask, p, False, torch.float32)),
        ("loss bwd pix+imgs", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred, mask, mask_sum, p, False, True)),
        # ViT-H/14: a patch of 14 is padded to a 16x16 tile (masked lanes)
        ("gather nchw p14", patch_gather, lambda: patch_gather.gather_patches(imgs, ids_keep14, 14)),
        ("loss fwd normpix p14", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred14, mask14, 14, True, torch.float32)),
        ("loss bwd normpix p14", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred14, mask14, mask_sum, 14, True, False)),
        ("loss bwd normpix+imgs p14", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred14, mask14, mask_sum, 14, True, True)),
        # the official pred[:, 1:, :]: 16-byte aligned at patch 16 (768 bf16 = 1536 B in), 8-byte
        # aligned at patch 14 (588 bf16 = 1176 B in); fp32 at patch 14 (2352 B in: aligned)
        ("loss fwd normpix pred[:, 1:]", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred_slice, mask, p, True, torch.float32)),
        ("loss bwd normpix pred[:, 1:]", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred_slice, mask, mask_sum, p, True, False)),
        ("loss fwd normpix p14 pred[:, 1:] (8-B aligned)", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred14_slice, mask14, 14, True, torch.float32)),
        ("loss bwd normpix p14 pred[:, 1:] (8-B aligned)", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred14_slice, mask14, mask_sum, 14, True, False)),
        ("loss fwd normpix p14 fp32 pred[:, 1:]", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred14_fp32, mask14, 14, True, torch.float32)),
        ("loss bwd normpix+imgs p14 fp32 pred[:, 1:]", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred14_fp32, mask14, mask_sum, 14, True, True)),
        # uint8 images (fp32 model / autocast: fp32 patches; a bf16 model: bf16 patches)
        ("gather u8 nchw", patch_gather, lambda: patch_gather.gather_patches_normalized(
            imgs_u8, ids_keep, p, pixel_norm, torch.float32)),
        ("gather u8 nhwc bf16", patch_gather, lambda: patch_gather.gather_patches_normalized(
            imgs_u8_nhwc, ids_keep, p, pixel_norm, torch.bfloat16)),
        ("gather u8 nchw p14", patch_gather, lambda: patch_gather.gather_patches_normalized(
            imgs_u8, ids_keep14, 14, pixel_norm, torch.float32)),
        ("loss fwd u8 normpix", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs_u8, pred, mask, p, True, torch.float32, pixel_norm, torch.float32)),
        ("loss bwd u8 normpix", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs_u8, pred, mask, mask_sum, p, True, False, pixel_norm, torch.float32)),
        ("loss fwd u8 pix nhwc", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs_u8_nhwc, pred, mask, p, False, torch.float32, pixel_norm, torch.float32)),
        ("loss bwd u8 normpix nhwc bf16", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs_u8_nhwc, pred, mask, mask_sum, p, True, False, pixel_norm, torch.bfloat16)),
        ("loss fwd u8 normpix p14 pred[:, 1:] (8-B aligned)", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs_u8, pred14_slice, mask14, 14, True, torch.float32, pixel_norm, torch.float32)),
        ("loss bwd u8 normpix p14 pred[:, 1:] (8-B aligned)", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs_u8, pred14_slice, mask14, mask_sum, 14, True, False, pixel_norm, torch.float32)),
        ("gemm u8 bf16 MMA (autocast)", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs_u8, weight, bias, pos_embed, cls_token, ids_keep, torch.bfloat16, torch.float32,
            pixel_norm, torch.float32)),
        ("gemm u8 fp32 IEEE p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs_u8, weight14, bias, pos_embed14, cls_token, ids_keep14, torch.float32, torch.float32,
            pixel_norm, torch.float32)),
        ("gemm bwd u8 bf16 MMA (autocast)", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens, imgs_u8, ids_keep, weight.shape, torch.bfloat16, torch.float32, torch.float32,
            torch.float32, pixel_norm, torch.float32)),
        ("gemm bwd u8 fp32 IEEE p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens14, imgs_u8, ids_keep14, weight14.shape, torch.float32, torch.float32,
            torch.float32, torch.float32, pixel_norm, torch.float32)),
        ("loss fwd normpix rows (decoder masking)", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred_rows, None, p, True, torch.float32, row_ids=row_ids)),
        ("loss bwd normpix rows (decoder masking)", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred_rows, None, mask_sum, p, True, False, row_ids=row_ids)),
        ("loss bwd normpix+imgs rows (decoder masking)", masked_loss, lambda: masked_loss.masked_loss_bwd(
            grad_loss, imgs, pred_rows, None, mask_sum, p, True, True, row_ids=row_ids)),
        ("loss fwd pix rows (decoder masking)", masked_loss, lambda: masked_loss.masked_loss_fwd(
            imgs, pred_rows, None, p, False, torch.float32, row_ids=row_ids)),
        ("loss fwd normpix p14 rows (decoder masking, 8-B aligned)", masked_loss,
         lambda: masked_loss.masked_loss_fwd(imgs, pred14_rows, None, 14, True, torch.float32, row_ids=row_ids14)),
        ("loss bwd normpix+imgs p14 rows (decoder masking, 8-B aligned)", masked_loss,
         lambda: masked_loss.masked_loss_bwd(grad_loss, imgs, pred14_rows, None, mask_sum, 14, True, True,
                                             row_ids=row_ids14)),
        ("gemm bf16 MMA (autocast)", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs, weight, bias, pos_embed, cls_token, ids_keep, torch.bfloat16, torch.float32)),
        ("gemm fp32 IEEE", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs, weight, bias, pos_embed, cls_token, ids_keep, torch.float32, torch.float32)),
        ("gemm bwd bf16 MMA (autocast)", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens, imgs, ids_keep, weight.shape, torch.bfloat16, torch.float32, torch.float32,
            torch.float32)),
        ("gemm bwd fp32 IEEE", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens, imgs, ids_keep, weight.shape, torch.float32, torch.float32, torch.float32,
            torch.float32)),
        ("gemm bf16 MMA p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs, weight14, bias, pos_embed14, cls_token, ids_keep14, torch.bfloat16, torch.float32)),
        ("gemm fp32 IEEE p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm(
            imgs, weight14, bias, pos_embed14, cls_token, ids_keep14, torch.float32, torch.float32)),
        ("gemm bwd bf16 MMA p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens14, imgs, ids_keep14, weight14.shape, torch.bfloat16, torch.float32,
            torch.float32, torch.float32)),
        ("gemm bwd fp32 IEEE p14", patch_embed_gemm, lambda: patch_embed_gemm.patch_embed_gemm_backward(
            grad_tokens14, imgs, ids_keep14, weight14.shape, torch.float32, torch.float32,
            torch.float32, torch.float32)),
    ]
    calls += mlp_calls() + _add_layer_norm_calls(N)
    out, seen = [], set()
    for label, module, call in calls:
        sink = []
        with _recording(module, sink):
            call()
        for i, (name, grid, args, kwargs) in enumerate(sink):
            key = (name, repr([_specialisation(a) for a in args]), repr(sorted(kwargs.items())))
            if key in seen:  # e.g. the reduce kernel is launched the same way every time
                continue
            seen.add(key)
            out.append((label if i == 0 else f"{label} ({name.strip('_').replace('_kernel', '')})",
                        module, name, args, kwargs))
    return out


def _add_layer_norm_calls(N):
    """The fused residual add + LayerNorm (kernels/add_layer_norm.py) as the blocks launch it:
    ViT-L/16's encoder (1 + 49 tokens, D 1024) and decoder (1 + 196 tokens, D 512) rows, bf16
    (x, branch, parameters bf16) and amp-bf16 (fp32 stream + bf16 branch -> fp32 h and y, fp32
    parameters), the first norm1 (no branch) and the last norm (no dh), fp16, and ViT-B / ViT-H
    widths (768, 1280) and the widest the op takes (MAX_WIDTH: BLOCK_D 4096, 16 warps)."""
    import torch
    from mae_fast.kernels import add_layer_norm as kernels
    from mae_fast.ops.layernorm import MAX_WIDTH, block_rows, bwd_programs

    meta = torch.device("meta")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

    def t(*shape, dtype=fp32):
        return torch.empty(*shape, dtype=dtype, device=meta)

    def fwd(label, R, D, x_dtype, branch_dtype, param_dtype, y_dtype):
        def call():
            kernels.add_layer_norm_fwd(t(R, D, dtype=x_dtype), t(R, D, dtype=branch_dtype) if branch_dtype else None,
                                       t(D, dtype=param_dtype), t(D, dtype=param_dtype), 1e-6, y_dtype,
                                       block_rows(D))
        return (label, kernels, call)

    def bwd(label, R, D, dy_dtype, h_dtype, param_dtype, dh=True):
        def call():
            kernels.add_layer_norm_bwd(t(R, D, dtype=dy_dtype), t(R, D, dtype=h_dtype) if dh else None,
                                       t(R, D, dtype=h_dtype), t(D, dtype=param_dtype), t(R), t(R),
                                       *bwd_programs(R, D), block_rows(D), h_dtype)
        return (label, kernels, call)

    enc, dec = N * 50, N * 197
    return [
        fwd("add+LN fwd bf16 D1024", enc, 1024, bf16, bf16, bf16, bf16),
        fwd("add+LN fwd amp-bf16 D1024", enc, 1024, fp32, bf16, fp32, fp32),
        fwd("LN fwd (no branch) bf16 D1024", enc, 1024, bf16, None, bf16, bf16),
        fwd("add+LN fwd bf16 D512 (decoder)", dec, 512, bf16, bf16, bf16, bf16),
        fwd("add+LN fwd fp16 D768", enc, 768, fp16, fp16, fp16, fp16),
        fwd("add+LN fwd bf16 D1280", enc, 1280, bf16, bf16, bf16, bf16),
        fwd("add+LN fwd fp32 D4096 (max)", enc, MAX_WIDTH, fp32, fp32, fp32, fp32),
        bwd("add+LN bwd bf16 D1024", enc, 1024, bf16, bf16, bf16),
        bwd("add+LN bwd amp-bf16 D1024", enc, 1024, fp32, fp32, fp32),
        bwd("LN bwd (no dh) bf16 D1024", enc, 1024, bf16, bf16, bf16, dh=False),
        bwd("add+LN bwd bf16 D512 (decoder)", dec, 512, bf16, bf16, bf16),
        bwd("add+LN bwd fp16 D768", enc, 768, fp16, fp16, fp16),
        bwd("add+LN bwd bf16 D1280", enc, 1280, bf16, bf16, bf16),
        bwd("add+LN bwd fp32 D4096 (max)", enc, MAX_WIDTH, fp32, fp32, fp32),
    ]


# the opt-in MLP GEMMs (MAE_FAST_MLP=gemm): (embed dim, MLP hidden dim, token rows at batch 256)
# of the ViT-B/16, ViT-L/16, ViT-H/14 encoders and the decoder (512 / 2048, 197 tokens)
MLP_WIDTHS = {"ViT-B/16": (768, 3072, 256 * 50), "ViT-L/16": (1024, 4096, 256 * 50),
              "ViT-H/14": (1280, 5120, 256 * 65), "decoder": (512, 2048, 256 * 197)}


def mlp_calls():
    """Every launch of kernels/mlp_gemm.py at every MLP width, in bf16, fp16 (autocast or pure
    low precision) and fp32: fc1 + GELU (forward), fc2's grad-input GEMM with GELU', and the
    weight-gradient GEMM with the bias sums (fc2's: G = dy, X = act; fc1's: G = d(pre), X = x;
    the qkv projection's: G = dq | dk | dv, three column parts, X = x), and the residual epilogue
    of fc2 and of the attention proj (MAE_FAST_MLP=gemm blocks).
    The widths are all multiples of 16, so they specialise alike and `launches` keeps the first
    of each (tests/test_mlp_gemm.py checks this)."""
    import torch
    from mae_fast.kernels import mlp_gemm

    meta = torch.device("meta")
    calls = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        for model, (C, H, M) in MLP_WIDTHS.items():
            t = lambda *shape: torch.empty(*shape, dtype=dtype, device=meta)  # noqa: E731
            x, w1, b1, w2, pre = t(M, C), t(H, C), t(H), t(C, H), t(M, H)
            calls += [
                (f"mlp fc1+GELU {tag}", mlp_gemm, lambda x=x, w1=w1, b1=b1: mlp_gemm.fc1_gelu(x, w1, b1)),
                (f"mlp fc2 dgrad*GELU' {tag}", mlp_gemm,
                 lambda x=x, w2=w2, pre=pre: mlp_gemm.fc2_gelu_grad(x, w2, pre)),
                (f"mlp wgrad+bias {tag}", mlp_gemm, lambda x=x, pre=pre: mlp_gemm.linear_weight_grad(x, pre)),
                (f"mlp wgrad+bias {tag}", mlp_gemm, lambda x=x, pre=pre: mlp_gemm.linear_weight_grad(pre, x)),
                # the qkv projection's dW (3C, C) and db from dq, dk, dv (B*M, C) as 3 column parts
                (f"qkv wgrad+bias dq|dk|dv {tag}", mlp_gemm,
                 lambda x=x: mlp_gemm.linear_weight_grad(torch.empty_like(x), x, torch.empty_like(x),
                                                         torch.empty_like(x))),
            ]
            # the residual epilogue (MAE_FAST_MLP=gemm blocks): fc2 (act (M, H) -> (M, C)) and the
            # attention proj ((M, C) -> (M, C)), the stream in the GEMM's dtype, and (autocast)
            # an fp32 stream with a bf16 / fp16 GEMM
            streams = ((dtype, tag),) + (((torch.float32, f"{tag}+fp32 stream"),) if dtype != torch.float32 else ())
            for stream, label in streams:
                res = torch.empty(M, C, dtype=stream, device=meta)
                calls += [
                    (f"mlp residual {label}", mlp_gemm,
                     lambda pre=pre, w2=w2, b=t(C), res=res: mlp_gemm.linear_residual(pre, w2, b, res)),
                    (f"mlp residual {label}", mlp_gemm,
                     lambda x=x, w=t(C, C), b=t(C), res=res: mlp_gemm.linear_residual(x, w, b, res)),
                ]
    return calls


def _specialisation(a):
    """What the JIT compiles a separate kernel for: the type, ints equal to 1, divisibility,
    pointer alignment."""
    import torch
    if isinstance(a, int) and not isinstance(a, bool):
        return _arg_type(a), a == 1, a % 16 == 0
    if isinstance(a, torch.Tensor):
        return _arg_type(a), _aligned16(a)
    return _arg_type(a)


def _aligned16(t) -> bool:
    """Whether the tensor's data pointer is 16-byte aligned, as the JIT tests ``data_ptr() % 16``:
    allocations are (at least 256-byte) aligned, so it is the storage offset that decides."""
    return (t.storage_offset() * t.element_size()) % 16 == 0


def _arg_type(a):
    import torch
    if isinstance(a, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(a.dtype).replace("torch.", "")]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i64" if not -2 ** 31 <= a < 2 ** 31 else "i32"
    if isinstance(a, float):
        return "fp32"
    if a is None:
        return "constexpr"
    raise TypeError(f"unsupported kernel argument {a!r}")


def _source(fn, args, kwargs):
    """The JIT's specialisation of one launch, as an ASTSource."""
    import torch
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        ty = _arg_type(a)
        if not isinstance(a, torch.Tensor) and not isinstance(a, bool) and a == 1:
            signature[name], constexprs[name] = "constexpr", 1
            continue
        signature[name] = ty
        if (_aligned16(a) if isinstance(a, torch.Tensor) else isinstance(a, int) and a % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name], constexprs[name] = "constexpr", kwargs[name]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


# 16-byte asynchronous copies global -> shared (the software-pipelined GEMM tiles): 128-bit too
_CP16 = re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.c[ag]\.shared\.global[^;]*,\s*(?:0x10|16)\s*[,;]",
                   re.MULTILINE)
_V4 = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global[.\w]*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64|u64|s64))\b",
                 re.MULTILINE)


def _ptxas_report(ptx: str, cc: int):
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    arch = sm_arch_from_capability(cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                               src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    smem = re.search(r"(\d+) bytes smem", log)
    return arch, regs, spill_st + spill_ld, int(smem.group(1)) if smem else 0


def _compile_rows(archs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    result = []
    for label, module, name, args, kwargs in launches():
        fn = getattr(module, name)
        if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("Triton kernels are interpreted here; run with TRITON_INTERPRET=0")
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        for cc in archs:
            target = GPUTarget("cuda", cc, 32)
            opts = make_backend(target).parse_options(options).__dict__
            compiled = triton.compile(_source(fn, args, kwargs), target=target, options=opts)
            ptx = compiled.asm["ptx"]
            arch, regs, spills, smem = _ptxas_report(ptx, cc)
            vec = _V4.findall(ptx)
            result.append(dict(kernel=name.strip("_"), config=label, arch=arch, registers=regs,
                               spills=spills, shared=max(smem, compiled.metadata.shared),
                               ld128=sum(1 for v in vec if v == "ld"),
                               st128=sum(1 for v in vec if v == "st"),
                               cp16=len(_CP16.findall(ptx)),
                               num_warps=opts["num_warps"]))
    return result


def rows(archs=ARCHS):
    """One dict per (kernel config, arch): kernel, config, arch, registers, spills (bytes,
    stores + loads), shared (bytes), ld128 / st128 (128-bit global loads / stores in the PTX),
    cp16 (16-byte cp.async global -> shared copies: the pipelined GEMM tiles), num_warps."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0")
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json",
                              "--archs", ",".join(map(str, archs))],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"triton_aot subprocess failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout)
    return _compile_rows(archs)


def table(result) -> str:
    head = ("| kernel | launch (ViT-L/16, N=256) | arch | warps | registers | spills (B) | shared (B) "
            "| 128-bit ld | 128-bit st | 16-B cp.async |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in result:
        lines.append(f"| `{r['kernel']}` | {r['config']} | {r['arch']} | {r['num_warps']} | {r['registers']} "
                     f"| {r['spills']} | {r['shared']} | {r['ld128']} | {r['st128']} | {r.get('cp16', 0)} |")
    return "\n".join(lines)


def _versions() -> str:
    import platform

    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = subprocess.run([get_ptxas(80).path, "--version"], capture_output=True, text=True).stdout
    ptxas = re.search(r"release ([\d.]+)", ptxas).group(1)
    return (f"triton {triton.__version__}, torch {torch.__version__}, bundled ptxas {ptxas}, "
            f"python {platform.python_version()}")


def replace_doc_block(path: str, begin: str, end: str, body: str, title: str) -> None:
    """Write ``body`` between the ``begin`` / ``end`` markers of the markdown file ``path``
    (appending the markers, or creating the file under ``title``, when missing)."""
    text = open(path).read() if os.path.exists(path) else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    start, stop = text.index(begin), text.index(end) + len(end)
    with open(path, "w") as f:
        f.write(text[:start] + f"{begin}\n{body}\n{end}" + text[stop:])


def write_doc(result) -> None:
    replace_doc_block(DOC, BEGIN, END, f"Command: `.venv/bin/python tools/triton_aot.py --write-doc` on a "
                      f"2-core CPU container, no GPU ({_versions()}).\n\n{table(result)}", "Triton kernels")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--write-doc", action="store_true", help=f"write the table into {DOC}")
    args = parser.parse_args(argv)
    result = rows(tuple(int(a) for a in args.archs.split(",")))
    if args.json:
        print(json.dumps(result))
        return
    print(table(result))
    if args.write_doc:
        write_doc(result)
        print(f"written into {DOC}")


if __name__ == "__main__":
    # a fallback for `import mae_fast` only: an installed mae_fast (with its mae_fast.kernels, which
    # exists only once installed) must win over the checkout's mae_fast/ (CI's compat lane)
    sys.path.append(ROOT)
    main()
