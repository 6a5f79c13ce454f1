"""Training-step timing, interleaved: every round runs one step of each contender (the order
rotates each round), so drift of a shared machine hits all of them alike; the ratio is taken per
round (paired) and its median reported.

    .venv/bin/python benchmarks/interleaved.py --size vit_b16 --batch 8 --threads 2 --rounds 7 \
        [--official-mae /path/to/facebookresearch/mae] [--device cuda --dtype bf16]

Prints a markdown table: median / min seconds per step, and each contender's median per-round
ratio to mae_fast (> 1: mae_fast is faster).
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mae_contenders as mc  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(mc.SIZES), default="vit_b16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    ap.add_argument("--official-mae", default=None, help="path to a clone of facebookresearch/mae")
    ap.add_argument("--contenders", nargs="+", default=list(mc.CONTENDERS), choices=mc.CONTENDERS + mc.OPTIONAL_CONTENDERS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to time on cuda", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    found = mc.build_all(args.size, args.batch, device, DTYPES[args.dtype], args.official_mae,
                         args.contenders)
    runs = {n: c for n, c in found.items() if isinstance(c, mc.Contender)}
    for n, c in found.items():
        if isinstance(c, mc.Unavailable):
            print(f"skipped {n}: {c.reason}", file=sys.stderr)
    if "mae_fast" not in runs:
        print("mae_fast must be among the contenders (it is the baseline of the ratios)", file=sys.stderr)
        return 2

    names = list(runs)
    for n in names:
        runs[n].prepare()
        for _ in range(args.warmup):
            runs[n].step()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            runs[n].prepare()
            t0 = time.perf_counter()
            runs[n].step()
            times[n].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
              file=sys.stderr, flush=True)

    print(f"\nTraining step (forward + backward + AdamW), {args.size}, batch {args.batch}, "
          f"{args.dtype}, {device}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up steps each; torch {torch.__version__}, python "
          f"{platform.python_version()}\n")
    print("| contender | params | median s/step | min s/step | median paired ratio to mae_fast "
          "| min / mae_fast's min | what runs |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = times["mae_fast"]
    for n in names:
        ratio = statistics.median(t / b for t, b in zip(times[n], base))
        print(f"| {n} | {mc.param_count(runs[n].model) / 1e6:.1f} M | {statistics.median(times[n]):.3f} | "
              f"{min(times[n]):.3f} | {ratio:.3f}x | {min(times[n]) / min(base):.3f}x | {runs[n].note} |")
    others = [n for n in names if n in ("hf-vitmae", "official-timm", "official-math")]
    if others:
        paired = {n: statistics.median(t / b for t, b in zip(times[n], base)) for n in others}
        fastest = min(others, key=paired.get)  # the smallest ratio: the hardest contender
        ratio = paired[fastest]
        best_min = min(others, key=lambda n: min(times[n]))
        print(f"\nmae_fast vs the fastest of {', '.join(others)}: {ratio:.3f}x against {fastest} "
              f"(median of per-round ratios); {min(times[best_min]) / min(base):.3f}x against "
              f"{best_min} (ratio of the minimum step times). Goal >= 1.10x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
