"""Which autocast dtype a run uses (``--amp``), and why.

``--amp auto``:
* CUDA: bf16 where the GPU has it, else fp16 with a grad scaler;
* CPU: bf16 when the CPU computes bf16 natively (torch's own CPU-capability queries: AVX512-BF16
  or AMX tiles on x86, the BF16 extension on Arm through oneDNN) *and* the model is wide enough
  for bf16 GEMMs to pay: below ``CPU_BF16_MIN_WIDTH`` the casts around small matrices cost more
  than the faster GEMMs save (measured, docs/DEMO.md "bf16 on CPU"); fp32 otherwise.
The reason is printed in the run header.

``python -m mae_fast.train.amp`` times fp32 against bf16 autocast (forward + backward) for a few
model widths, interleaved, to find that crossover on the machine at hand.
"""
import platform

import torch

AMP_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}
# encoder width from which bf16 autocast is taken on a CPU with native bf16: measured faster for
# ViT-B (768), slower for the demo's 96-d model; widths in between were inside the noise of the
# shared 2-core CPU (docs/DEMO.md "bf16 on CPU")
CPU_BF16_MIN_WIDTH = 768


def cpu_native_bf16():
    """(True/False, what torch says): does this CPU compute bf16 natively?"""
    cpu = getattr(torch, "cpu", None)
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
            return True, "AMX tiles"
        if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
            return True, "AVX512-BF16"
        return False, "no AVX512-BF16 / AMX"
    try:  # Arm: oneDNN reports bf16 only with the BF16 extension
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True, "oneDNN bf16"
    except (AttributeError, RuntimeError):
        pass
    return False, "no native bf16 reported by oneDNN"


def resolve_amp(amp: str, device: torch.device, width: int = None):
    """(dtype or None, reason) for --amp auto|none|bf16|fp16 on ``device``; ``width``: the
    encoder's embedding width (for the CPU rule)."""
    if amp == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: this GPU has bf16"
            return torch.float16, "auto: this GPU has no bf16, fp16 with a grad scaler"
        if device.type != "cpu":
            return None, f"auto: no autocast on {device.type}"
        native, what = cpu_native_bf16()
        if not native:
            return None, f"auto: fp32, this CPU has no native bf16 ({what})"
        if width is not None and width < CPU_BF16_MIN_WIDTH:
            return None, (f"auto: fp32, the CPU has native bf16 ({what}) but width {width} < "
                          f"{CPU_BF16_MIN_WIDTH}: bf16 casts cost more than they save")
        return torch.bfloat16, f"auto: bf16, the CPU has native bf16 ({what})"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], f"--amp {amp}"


# ---------------------------------------------------------------------------------------------
# the measurement behind CPU_BF16_MIN_WIDTH
def _time_step(model, imgs, noise, dtype, reps):
    import time
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        times.append(time.perf_counter() - t)
    return times


def measure(configs, rounds: int = 3, reps: int = 2):
    """For each config (name, model factory kwargs, img size, batch, threads): median s/step of
    forward + backward in fp32 and bf16, the two interleaved round by round."""
    from functools import partial

    import torch.nn as nn

    from ..model import MaskedAutoencoderViT
    out = []
    for name, kw, size, batch, threads in configs:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(img_size=size, norm_layer=partial(nn.LayerNorm, eps=1e-6), mlp_ratio=4, **kw)
        imgs = torch.randn(batch, 3, size, size)
        noise = torch.rand(batch, model.patch_embed.num_patches)
        _time_step(model, imgs, noise, None, 1)  # warm-up
        _time_step(model, imgs, noise, torch.bfloat16, 1)
        t = {None: [], torch.bfloat16: []}
        for _ in range(rounds):
            for dtype in (None, torch.bfloat16):
                t[dtype] += _time_step(model, imgs, noise, dtype, reps)
        med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
        out.append((name, med[None], med[torch.bfloat16]))
        print(f"{name:44s} fp32 {med[None]:.4f} s  bf16 {med[torch.bfloat16]:.4f} s  "
              f"bf16 speed-up {med[None] / med[torch.bfloat16]:.2f}x", flush=True)
    return out


def _width(d, depth=2, dec=1, patch=16):
    return dict(patch_size=patch, embed_dim=d, depth=depth, num_heads=max(1, d // 64),
                decoder_embed_dim=max(64, d // 2), decoder_depth=dec, decoder_num_heads=max(1, d // 128))


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="fp32 vs bf16 autocast on this CPU, forward + backward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vit-b", action="store_true", help="also ViT-B/16 at 224 px, batch 4 (slow)")
    a = p.parse_args()
    print(f"torch {torch.__version__}, native bf16: {cpu_native_bf16()}")
    configs = [("demo: tiny_patch8 96-d, 64px, batch 64, 1 thread",
                dict(patch_size=8, embed_dim=96, depth=3, num_heads=4, decoder_embed_dim=64, decoder_depth=1,
                     decoder_num_heads=4), 64, 64, 1)]
    for d in (96, 192, 384, 768):
        configs.append((f"width {d}, depth 2+1, 224px/16, batch 4", _width(d), 224, 4, a.threads))
    for d in (192, 384):
        configs.append((f"width {d}, depth 2+1, 64px/8, batch 64", _width(d, patch=8), 64, 64, a.threads))
    if a.vit_b:
        configs.append(("ViT-B/16 (768-d x 12 + 512-d x 8), 224px, batch 4",
                        dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                             decoder_depth=8, decoder_num_heads=16), 224, 4, a.threads))
    measure(configs, a.rounds)
