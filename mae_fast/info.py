"""``python -m mae_fast.info``: versions, whether ``mae_fast._C`` loaded (and with CUDA), and
which implementation each op runs on CPU and on CUDA tensors, with the reason. The answers
come from ``mae_fast.backends.choose``, the same call the model makes."""
import argparse
import importlib
import platform
import sys


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception as e:  # not installed, or broken (xformers built for another torch)
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"


def _decode_auto() -> str:
    from .data import resolve_decode
    mode, why = resolve_decode("auto")
    return f"{mode} ({why}; torchvision {_version('torchvision')})" if mode == "torchvision" else f"{mode} ({why})"


def decoder_masking_line(decoder_mask_ratio: float = 0.0, num_patches: int = 196, mask_ratio: float = 0.75) -> str:
    """Whether decoder-side masking (``decoder_mask_ratio``, not in the official MAE) is on."""
    if not decoder_mask_ratio:
        return "decoder-side masking: off (decoder_mask_ratio=0, the official decoder)"
    from .reference import num_decode, num_keep
    len_mask = num_patches - num_keep(num_patches, mask_ratio)
    return (f"decoder-side masking: ON (decoder_mask_ratio={decoder_mask_ratio}): the decoder sees "
            f"{num_decode(len_mask, decoder_mask_ratio)} of the {len_mask} masked patches at {num_patches} "
            f"patches, mask {mask_ratio} (unshuffle: its len_decode path; loss: masked_loss_rows)")


def block_implementation_line(mlp_mode: str) -> str:
    """Which form the fused blocks run (mae_fast.layers: pending or stream)."""
    if mlp_mode == "gemm":
        return ("block implementation: stream (MAE_FAST_MLP=gemm, where the MLP runs triton, not under "
                "torch.compile): each residual add in the epilogue of the GEMM that makes the branch "
                "(mae_fast::linear_residual for the attention proj, mae_fast::mlp_fc2 for fc2), each "
                "LayerNorm without an add (its backward sums the stream's two gradients); elsewhere the "
                "pending form; model.set_fused_blocks(False) gives the plain blocks")
    return ("block implementation: pending (each residual add with the LayerNorm after it, "
            "add_layer_norm); MAE_FAST_MLP=gemm runs the stream form (the adds in the proj / fc2 GEMM "
            "epilogues); model.set_fused_blocks(False) gives the plain blocks")


def report(backend: str = "auto", decoder_mask_ratio: float = 0.0) -> str:
    import torch

    from . import __version__, _ext, backends
    from .ops.mlp import mlp_mode

    lines = [f"mae_fast {__version__}",
             f"python {platform.python_version()} on {platform.machine()}",
             f"torch {torch.__version__} (built with CUDA {torch.version.cuda}); "
             f"CUDA available: {torch.cuda.is_available()}"
             + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
             f"triton {_version('triton')}",
             f"xformers {_version('xformers')}",
             f"data: --decode auto -> {_decode_auto()}",
             f"mae_fast._C: {_ext.how_obtained()}"
             + (f"; CUDA kernels {'compiled in' if _ext.built_with_cuda() else 'not compiled in'}"
                if _ext.LOADED else ""),
             "",
             f"backend={backend!r}: which implementation runs each op, and why"]
    for device in ("cpu", "cuda"):
        lines.append(f"  on {device} tensors:")
        for op in backends.ops():
            attn_backend = "math" if (op == "attention" and backend == "reference") else (
                "auto" if op == "attention" else backend)
            try:
                c = backends.choose(op, device, attn_backend)
                lines.append(f"    {op:20s} {c.impl:10s} {c.reason}")
            except Exception as e:
                lines.append(f"    {op:20s} {'ERROR':10s} {e}")
    lines += ["", "blocks: qkv projection + attention as one autograd function whose backward never merges "
              "dq, dk, dv into d(qkv) (mae_fast.attention.qkv_attention), where attention runs sdpa or "
              "xformers with gradients and not under torch.compile; model.set_fused_blocks(False) "
              "gives the plain blocks",
              "blocks: each residual add runs with the LayerNorm after it (norm2, the next block's norm1, "
              "the final norm) as one op, add_layer_norm above (Triton where it says triton, else the plain "
              "add + F.layer_norm); model.set_fused_blocks(False) gives the plain blocks"]
    try:
        mode = mlp_mode()
    except ValueError as e:
        mode = f"ERROR {e}"
    lines.append(f"MLP GEMM path (opt-in, MAE_FAST_MLP=gemm; GPU speed not measured): {mode}")
    lines.append(block_implementation_line(mode))
    lines.append(decoder_masking_line(decoder_mask_ratio))
    lines += ["contrastive MAE (CAN-style InfoNCE over two masked views, mae_fast.ContrastiveMAE): off by default; "
              "on with `mae-fast pretrain --contrastive-weight W` (the run header then says so); the plain "
              "MaskedAutoencoderViT never runs it"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mae_fast.info", description=__doc__)
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "fast"))
    parser.add_argument("--decoder-mask-ratio", type=float, default=0.0,
                        help="say what decoder-side masking at this ratio decodes (ViT-B/16, mask 0.75)")
    args = parser.parse_args(argv)
    print(report(args.backend, args.decoder_mask_ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
