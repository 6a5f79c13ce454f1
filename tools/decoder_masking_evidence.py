"""Decoder-side masking (``decoder_mask_ratio``): FLOPs of one training step (on meta, through
``mae_fast.accounting``) and CPU step time, ViT-B/16, at several ratios.

    .venv/bin/python tools/decoder_masking_evidence.py flops --batch 4
    .venv/bin/python tools/decoder_masking_evidence.py time --batch 4 --rounds 5

``time`` runs forward + backward + a for-each AdamW step of one fp32 model on CPU, the ratios
interleaved round by round in this one process (so a change in the machine's load hits every
ratio alike), and prints each ratio's median and the per-round times.
"""
import argparse
import statistics
import sys
import time

import torch

RATIOS = (0.0, 0.5, 0.75)


def flops(batch: int, ratios, mask_ratio: float = 0.75) -> None:
    from mae_fast import accounting
    from mae_fast.model import mae_vit_base_patch16

    print(f"ViT-B/16, 224 px, batch {batch}, mask {mask_ratio}, fp32, forward + backward "
          "(torch.utils.flop_counter formulas; GFLOP per step)")
    print("| decoder_mask_ratio | decoder tokens (cls + visible + decoded) | forward | backward | step | vs 0 |")
    print("|---|---|---|---|---|---|")
    base = None
    for ratio in ratios:
        with torch.device("meta"):
            mae = mae_vit_base_patch16(backend="fast", decoder_mask_ratio=ratio)
        counter = accounting.count_step(mae, batch, mask_ratio, optimizer="none", precision="fp32")
        fwd = counter.total(phases=("fwd",)).flops / 1e9
        bwd = counter.total(phases=("bwd",)).flops / 1e9
        L = mae.patch_embed.num_patches
        K = mae._len_keep(L, mask_ratio)
        M = mae._len_decode(L - K) if ratio else L - K
        base = base or fwd + bwd
        print(f"| {ratio} | 1 + {K} + {M} = {1 + K + M} | {fwd:.1f} | {bwd:.1f} | {fwd + bwd:.1f} "
              f"| {(fwd + bwd) / base:.3f} |")


def step_times(batch: int, ratios, rounds: int, steps: int, threads: int, mask_ratio: float = 0.75) -> None:
    from mae_fast.model import mae_vit_base_patch16

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mae_vit_base_patch16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    imgs = torch.randn(batch, 3, 224, 224)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(imgs, mask_ratio)[0]
        loss.backward()
        opt.step()

    times = {r: [] for r in ratios}
    for ratio in ratios:  # warm-up: one step each
        model.set_decoder_mask_ratio(ratio)
        step()
    for rnd in range(rounds):
        order = ratios if rnd % 2 == 0 else tuple(reversed(ratios))  # alternate the order too
        for ratio in order:
            model.set_decoder_mask_ratio(ratio)
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times[ratio].append(time.perf_counter() - t0)
                print(f"round {rnd}: ratio {ratio}: {times[ratio][-1]:.2f} s", file=sys.stderr, flush=True)
    print(f"ViT-B/16 fp32, batch {batch}, mask {mask_ratio}, CPU, {threads} thread(s), forward + backward + "
          f"AdamW; {rounds} rounds x {steps} step(s) per ratio, interleaved")
    print("| decoder_mask_ratio | median step (s) | vs 0 | all steps (s) |")
    print("|---|---|---|---|")
    base = statistics.median(times[ratios[0]])
    for ratio in ratios:
        med = statistics.median(times[ratio])
        print(f"| {ratio} | {med:.2f} | {med / base:.3f} | {', '.join(f'{t:.2f}' for t in times[ratio])} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("flops", "time"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="steps per ratio per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    if args.what == "flops":
        flops(args.batch, tuple(args.ratios))
    else:
        step_times(args.batch, tuple(args.ratios), args.rounds, args.steps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
