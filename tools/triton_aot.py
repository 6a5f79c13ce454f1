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
    activations (no autocast) and the fp32 GEMM."""
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
