#!/usr/bin/env python3
"""``make gpu-check``: everything mae_fast needs to prove on a GPU machine, in one command.

    python3 tools/gpu_check.py [--out gpu-report] [--official-mae /path/to/facebookresearch/mae]
    python3 tools/gpu_check.py --dry-run       # the same harness on CPU, tiny shapes, no nvcc

Stages, in priority order; each runs in a subprocess with a time budget (one that overruns is
killed and noted, the report is still written), all of them within ``--total-budget`` seconds:

  build       ``_C`` against the installed torch (BUILD_CMD below, MAX_JOBS from the cores,
              TORCH_CUDA_ARCH_LIST from the present GPU; nothing downloaded)
  lane        the CUDA test lane (``MAE_FAST_TEST_DEVICE=cuda pytest tests -m cuda -x``), log kept;
              it must pass: the exit status is non-zero when it failed or was skipped
  train_b16   ViT-B/16 training step, eager, bf16 autocast: mae_fast (default, and with the opt-in
              MAE_FAST_MLP=gemm Triton GEMMs) vs HF ViTMAE (transformers) and the official
              models_mae.py (--official-mae); CUDA events, warm-up, interleaved
              rounds, median, peak memory; the first step with an empty Triton cache (JIT warm-up)
  ops         each fused op vs the official op sequence it replaces (benchmarks/test_bench_ops.py
              cases and benchmarks/test_bench_masking.py functions), fwd and fwd+bwd; the first
              call of each fused op with an empty Triton cache
  train_l16   ViT-L/16, eager
  compiled    ViT-B/16 with ``nn.Module.compile()`` (inductor)

Writes ``report.json`` and ``report.md`` (versions, GPU, every number with the command that made
it) and the logs ``build.log``, ``lane.log``, ``lane.xml`` into ``--out``. Exit status: 0 all
good; 1 the build or the CUDA lane failed or did not run; 2 the lane passed but a later stage
errored or overran.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# The one command that builds mae_fast._C against the installed torch (no download: --no-deps
# --no-build-isolation). Switch here if the build is done another way (e.g. "{python} -m
# mae_fast.build").
BUILD_CMD = "{python} -m pip install --no-deps --no-build-isolation -e ."

# name -> (budget seconds on the GPU machine, what it proves); the order is the priority
STAGES = {
    "build": (180, "mae_fast._C compiled with nvcc against the installed torch, for this GPU"),
    "lane": (300, "the CUDA test lane: compiled Triton kernels and _C CUDA ops vs mae_fast.reference"),
    "train_b16": (100, "ViT-B/16 training step, eager, bf16 autocast: mae_fast (default and MAE_FAST_MLP=gemm) "
                       "vs HF ViTMAE (+ official)"),
    "ops": (60, "each fused op vs the official op sequence it replaces (+ cold Triton JIT per op)"),
    "train_l16": (75, "ViT-L/16 training step, eager, bf16 autocast (mae_fast default and MAE_FAST_MLP=gemm)"),
    "compiled": (120, "ViT-B/16 training step with torch.compile (inductor), bf16 autocast"),
}
TOTAL_BUDGET_S = 480  # 8 minutes on an H100
MIN_STAGE_S = 15  # a stage with less time left than this is skipped
DRY_RUN_STAGE_S = 120  # per stage in a dry run (CPU, tiny shapes)

NOT_COVERED_BY_DRY_RUN = {
    "nvcc": "the _C build is not run (the installed build is only imported)",
    "compiled kernels": "Triton kernels are not compiled for a GPU; the lane's CUDA tests all skip",
    "CUDA events": "timings use time.perf_counter on CPU, tiny shapes: the numbers mean nothing",
    "CUDA graphs": "the CUDA-graph training-step test skips",
    "peak memory": "torch.cuda.max_memory_allocated is not available",
    "cold Triton JIT": "no GPU compile happens; first-call times are the interpreter's",
}

# dry run (CPU) vs GPU run: sizes, batches, rounds
PLAN = {
    False: dict(train_b16=("vit_b16", 64), train_l16=("vit_l16", 32), compiled=("vit_b16", 64),
                op_batch=64, op_dtype="bf16", rounds=5, iters=3, warmup=2),
    True: dict(train_b16=("tiny", 2), train_l16=("tiny", 2), compiled=("tiny", 2),
               op_batch=1, op_dtype="fp32", rounds=2, iters=1, warmup=1),
}


# ---- helpers used by the parent and by the stages ----------------------------------------------

def _version(module):
    try:
        return __import__(module).__version__
    except Exception as e:  # not installed, or broken
        return f"not importable ({type(e).__name__})"


def _run(cmd, env=None, timeout=None, log=None):
    """Run cmd (a list); output to ``log`` (a path) or captured. -> (rc or "timeout", seconds, output)."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.PIPE
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
        rc, text = proc.returncode, (proc.stdout or "")
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or "") if isinstance(e.stdout, str) else ""
    finally:
        if log:
            out.close()
    if log:
        with open(log) as f:
            text = f.read()
    return rc, round(time.perf_counter() - t0, 2), text


def _env(bench=False, **extra):
    """os.environ with the repo (and benchmarks/, for the measuring stages) importable."""
    env = dict(os.environ)
    paths = [ROOT] + ([BENCHMARKS] if bench else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _gpu_facts():
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return dict(name=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2 ** 30, 1), count=torch.cuda.device_count())


def _facts():
    import torch

    nvcc = "not found"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                torch=torch.__version__, torch_cuda=torch.version.cuda, triton=_version("triton"),
                transformers=_version("transformers"), timm=_version("timm"), nvcc=nvcc,
                mae_fast_commit=commit, gpu=_gpu_facts())


# ---- timing (inside the stage subprocesses) ------------------------------------------------------

class _Clock:
    """Seconds of a callable: CUDA events on CUDA (GPU time from the first launch to the last),
    time.perf_counter on CPU (the dry run)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn, iters):
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    def first_call(self, fn):
        """Wall seconds of one call, synchronized: with an empty Triton cache, the JIT warm-up."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def _interleaved(clock, fns, rounds, iters):
    """{name: [seconds per call, one per round]}: every round times each fn (order rotating)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(clock.time(fns[n], iters))
    return times


def _summary(samples, baseline=None):
    out = dict(median_ms=round(statistics.median(samples) * 1e3, 4), min_ms=round(min(samples) * 1e3, 4),
               rounds=len(samples))
    if baseline is not None:  # paired per-round ratio: > 1 means the baseline is faster
        out["ratio_to_baseline"] = round(statistics.median(s / b for s, b in zip(samples, baseline)), 3)
    return out


# ---- stage bodies (run as ``gpu_check.py --stage NAME``) ----------------------------------------

def stage_train(args, device, plan):
    """One AdamW step (mae_contenders) per contender, under bf16 autocast, interleaved."""
    import torch
    import mae_contenders as mc

    size, batch = plan[args.stage_key]
    # mae_fast-gemm: the opt-in Triton GEMM path whose modeled 1.31-1.39x over HF
    # (docs/PERFORMANCE.md 1h) rests on those GEMMs reaching cuBLAS's efficiency: measured here
    names = ("mae_fast", "mae_fast-gemm", "mae_fast-reference", "hf-vitmae", "official-timm")
    if args.stage_key == "compiled":
        names = ("mae_fast", "hf-vitmae", "official-timm")
    clock = _Clock(device)
    if device.type == "cuda":  # CUDA context, cuBLAS handles: not the models' warm-up
        torch.ones(256, 256, device=device) @ torch.ones(256, 256, device=device)
        clock.sync()
    found = mc.build_all(size, batch, device, torch.float32, args.official_mae, names)
    runs = {n: c for n, c in found.items() if isinstance(c, mc.Contender)}
    result = dict(size=size, batch=batch, autocast="bf16", mask_ratio=mc.MASK_RATIO,
                  unavailable={n: c.reason for n, c in found.items() if isinstance(c, mc.Unavailable)},
                  notes={n: c.note for n, c in runs.items()}, contenders={})
    if args.stage_key == "compiled":
        for c in runs.values():  # nn.Module.compile: the contender's step calls the compiled module
            # (the dry run only traces: backend="eager" skips code generation)
            c.model.compile(**({} if device.type == "cuda" else dict(backend="eager")))

    def autocast_step(c):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                c.step()
        return run

    steps = {}
    for n, c in runs.items():
        c.prepare()
        steps[n] = (lambda c=c, run=autocast_step(c): (c.prepare(), run()))
        first = clock.first_call(autocast_step(c))  # empty Triton cache: includes the JIT
        for _ in range(plan["warmup"]):
            autocast_step(c)()
        entry = dict(first_step_s=round(first, 3), params=mc.param_count(c.model))
        if device.type == "cuda":
            clock.sync()
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            autocast_step(c)()
            entry["peak_step_mib_above_resident"] = round(
                (torch.cuda.max_memory_allocated(device) - resident) / 2 ** 20, 1)
        result["contenders"][n] = entry
    times = _interleaved(clock, steps, plan["rounds"], plan["iters"])
    for n in runs:
        result["contenders"][n].update(_summary(times[n], times.get("mae_fast")))
    return result


def stage_ops(args, device, plan):
    """Per op, fast vs reference, fwd and fwd+bwd, the cases of benchmarks/test_bench_ops.py."""
    import torch
    import test_bench_ops as bo
    import test_bench_masking as bm
    from mae_fast.backends import choose

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["op_dtype"]]
    N = plan["op_batch"]
    clock = _Clock(device)
    result = dict(batch=N, dtype=plan["op_dtype"], shapes=f"ViT-B/16 at 224 px: L={bo.L}, K={bo.K}, "
                  f"D={bo.D}, decoder {bo.DD}", ops={})
    for op, dispatch_op in bo.OP_NAMES.items():
        backends = {"reference": "reference", "fast": "auto"} if op == "attention" else \
            {"reference": "reference", "fast": "fast"}
        entry = {}
        for label, backend in backends.items():
            if op == "attention":
                entry[f"{label}_impl"] = choose("attention", device, "math" if backend == "reference" else "auto").impl
                continue
            choice = choose(dispatch_op, device, "auto" if backend == "fast" else backend)
            entry[f"{label}_impl"] = choice.impl
        if entry["fast_impl"] == "reference":
            entry["note"] = "no fused implementation runs here (dispatcher: " + \
                choose(dispatch_op, device, "auto").reason + ")"
            result["ops"][op] = entry
            continue
        for pass_ in ("fwd", "fwd+bwd"):
            fns = {}
            for label in backends:
                fwd, wants, grad = bo.make_case(op, label, N, device, dtype)
                fns[label] = fwd if pass_ == "fwd" else \
                    (lambda fwd=fwd, wants=wants, grad=grad: torch.autograd.grad(fwd(), wants, grad))
            entry[f"{pass_}_first_call_fast_s"] = round(clock.first_call(fns["fast"]), 3)
            for fn in fns.values():
                for _ in range(plan["warmup"]):
                    fn()
            times = _interleaved(clock, fns, plan["rounds"], plan["iters"] * 3)
            entry[pass_] = {label: _summary(times[label], times["fast"]) for label in fns}
        result["ops"][op] = entry
    # random masking: the official argsort sequence vs the _C op (test_bench_masking's functions)
    noise = torch.rand(N, bo.L, generator=torch.Generator().manual_seed(0)).to(device)
    if choose("random_masking", device, "auto").impl == "c++":
        fns = {"reference": lambda: bm.FUNCTIONS["reference"](noise, bo.K),
               "fast": lambda: bm.FUNCTIONS["c++"](noise, bo.K)}
        for fn in fns.values():
            fn()
        times = _interleaved(clock, fns, plan["rounds"], plan["iters"] * 3)
        result["ops"]["random masking"] = dict(reference_impl="reference", fast_impl="c++", fwd={
            label: _summary(times[label], times["fast"]) for label in fns})
    return result


# ---- the parent: stages as subprocesses, then the report -----------------------------------------

def _stage_cmd(args, name, out_json):
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--stage-out", out_json]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.official_mae:
        cmd += ["--official-mae", args.official_mae]
    return cmd


def _arch_list():
    gpu = _gpu_facts()
    return gpu["capability"] if gpu else None


def run_build(args, budget):
    python = shlex.quote(sys.executable)
    cmd = BUILD_CMD.format(python=python)
    arch = _arch_list()
    # nothing downloaded (no index), and a system python marked externally managed (PEP 668) still
    # takes the editable install: the GPU machines are bare, one-shot environments
    env = _env(MAX_JOBS=os.cpu_count() or 1, PIP_NO_INDEX=1, PIP_DISABLE_PIP_VERSION_CHECK=1,
               PIP_BREAK_SYSTEM_PACKAGES=1)
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    check = [sys.executable, "-c", "import mae_fast._ext as e; print('LOADED', e.LOADED, 'CUDA', "
             "e.built_with_cuda(), 'ERROR', e.LOAD_ERROR)"]
    shown = f"MAX_JOBS={env['MAX_JOBS']} TORCH_CUDA_ARCH_LIST={arch or '<from the GPU>'} PIP_NO_INDEX=1 {cmd}"
    if args.dry_run:
        rc, secs, text = _run(check, env=env, timeout=budget)
        return dict(status="not run (dry run)" if rc == 0 else "failed", seconds=secs, command=shown,
                    note="dry run: nvcc not run; imported the installed build: " + text.strip())
    log = os.path.join(args.out, "build.log")
    rc, secs, _ = _run(shlex.split(cmd), env=env, timeout=budget, log=log)
    if rc != 0:
        return dict(status="timeout" if rc == "timeout" else "failed", seconds=secs, command=shown,
                    log="build.log", note=f"exit {rc}; see build.log")
    rc2, _, text = _run(check, env=env, timeout=120)
    ok = rc2 == 0 and "CUDA True" in text
    return dict(status="ok" if ok else "failed", seconds=secs, command=shown, log="build.log",
                note=text.strip() + ("" if ok else " (the CUDA lane needs _C built with CUDA)"))


def _junit_counts(path):
    root = ET.parse(path).getroot()
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    skip_reasons = {}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = next(c for c in case if c.tag == "skipped").get("message", "")
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts, skip_reasons


def run_lane(args, budget):
    xml = os.path.join(args.out, "lane.xml")
    targets = ["tests/test_cuda_lane.py"] if args.dry_run else ["tests"]
    flags = [*targets, "-m", "cuda", "-x", "-q", "-rs", "--durations=15", "-p", "no:cacheprovider"]
    if not args.dry_run and importlib.util.find_spec("xdist") is not None:
        # pytest-xdist, when installed: the Triton JIT compiles of a cold machine in parallel
        flags += ["-n", str(min(8, os.cpu_count() or 1))]
    cmd = [sys.executable, "-m", "pytest", *flags, f"--junitxml={xml}"]
    shown = "MAE_FAST_TEST_DEVICE=cuda python -m pytest " + " ".join(flags) + " --junitxml=lane.xml"
    rc, secs, text = _run(cmd, env=_env(MAE_FAST_TEST_DEVICE="cuda"), timeout=budget,
                          log=os.path.join(args.out, "lane.log"))
    entry = dict(seconds=secs, command=shown, log="lane.log")
    if rc == "timeout" or not os.path.exists(xml):
        return dict(entry, status="timeout" if rc == "timeout" else "failed",
                    note=f"over its {budget:.0f} s budget: killed" if rc == "timeout" else
                    f"pytest exit {rc}, no junit report: " + text.strip()[-800:])
    counts, skips = _junit_counts(xml)
    status, note = lane_status(rc, counts, skips)
    if args.dry_run and status == "skipped":
        status = "not run (dry run)"
    return dict(entry, counts=counts, skip_reasons=skips, status=status, note=note)


def lane_status(rc, counts, skip_reasons):
    """(status, note) of the CUDA lane from pytest's exit code and its junit counts: "ok" only
    when tests passed, none failed, and no test skipped for want of a GPU or of the CUDA lane."""
    not_run = [r for r in skip_reasons if "no GPU" in r or "CUDA lane" in r]
    if counts["failed"] or counts["errors"] or rc != 0:
        return "failed", f"pytest exit {rc}: {counts}; the first failure is in lane.log (-x)"
    if counts["passed"] == 0 or not_run:
        return "skipped", "the CUDA tests did not run: " + "; ".join(not_run or ["no test passed"])
    return "ok", f"{counts['passed']} passed, {counts['skipped']} skipped"


def run_measure(args, name, budget):
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "stage.json")
        cmd = _stage_cmd(args, name, out_json)
        # an empty Triton cache: the first call of each kernel pays the JIT (cold machine)
        # compiled kernels (the dry run: reference and _C on CPU, Triton ops noted as not run)
        env = _env(bench=True, TRITON_CACHE_DIR=os.path.join(tmp, "triton-cache"), TRITON_INTERPRET="0")
        rc, secs, text = _run(cmd, env=env, timeout=budget)
        shown = "TRITON_CACHE_DIR=<empty dir> python tools/gpu_check.py " + " ".join(
            shlex.quote(c) for c in cmd[2:] if c not in ("--stage-out", out_json))
        entry = dict(seconds=secs, command=shown)
        if rc == "timeout":
            return dict(entry, status="timeout", note=f"over its {budget:.0f} s budget: killed, not measured")
        if rc != 0 or not os.path.exists(out_json):
            return dict(entry, status="failed", note=f"exit {rc}: " + text.strip()[-1500:])
        with open(out_json) as f:
            return dict(entry, status="ok", result=json.load(f))


def write_report(args, facts, stages, started):
    report = dict(tool="tools/gpu_check.py", dry_run=args.dry_run, started=started,
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  total_budget_s=args.total_budget, facts=facts, stages=stages,
                  not_covered_by_dry_run=NOT_COVERED_BY_DRY_RUN if args.dry_run else {})
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    return report


def _ms(summary):
    return f"{summary['median_ms']:.3f} ms (min {summary['min_ms']:.3f}, {summary['rounds']} rounds)"


def render_markdown(report):
    facts, gpu = report["facts"], report["facts"]["gpu"]
    lines = [f"# gpu-check report{' (DRY RUN on CPU: no number here is a GPU number)' if report['dry_run'] else ''}",
             "", f"{report['started']} to {report['finished']}, `tools/gpu_check.py`, commit "
             f"`{facts['mae_fast_commit']}`", "",
             f"- GPU: {gpu['name'] + ' (sm_' + gpu['capability'].replace('.', '') + ', ' + str(gpu['memory_gib']) + ' GiB)' if gpu else 'none'}",
             f"- python {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}), triton "
             f"{facts['triton']}, transformers {facts['transformers']}, timm {facts['timm']}",
             f"- nvcc: {facts['nvcc']}; {facts['cpus']} CPUs; {facts['platform']}", "",
             "| stage | status | seconds | command | note |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        note = str(s.get("note", "")).replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | `{s.get('command', '')}` | {note} |")
    for s in report["stages"]:
        res = s.get("result")
        if not res:
            continue
        lines += ["", f"## {s['name']}: {STAGES[s['name']][1]}", "", f"command: `{s['command']}`", ""]
        if "contenders" in res:
            lines += [f"{res['size']}, batch {res['batch']}, {res['autocast']} autocast, mask ratio "
                      f"{res['mask_ratio']}; one step = forward + backward + AdamW. ratio = median over "
                      "rounds of (contender / mae_fast), > 1: mae_fast is faster.", "",
                      "| contender | step (median) | ratio | first step (empty Triton cache) | peak MiB above resident | note |",
                      "|---|---|---|---|---|---|"]
            for n, c in res["contenders"].items():
                lines.append(f"| {n} | {_ms(c)} | {c.get('ratio_to_baseline', '')} | {c['first_step_s']} s | "
                             f"{c.get('peak_step_mib_above_resident', 'n/a')} | {res['notes'].get(n, '')} |")
            for n, why in res["unavailable"].items():
                lines.append(f"| {n} | not run | | | | {why} |")
        if "ops" in res:
            lines += [f"{res['shapes']}, batch {res['batch']}, {res['dtype']}. ratio = median over rounds "
                      "of (reference / fast), > 1: fast is faster. First call: wall time of the fast "
                      "path's first call in a process with an empty Triton cache (JIT compile included; "
                      "fwd+bwd's pays only what fwd did not compile).", "",
                      "| op | pass | reference | fast | ratio | fast first call (empty Triton cache) |",
                      "|---|---|---|---|---|---|"]
            for op, e in res["ops"].items():
                if "note" in e:
                    lines.append(f"| {op} | | | | | {e['note']} |")
                    continue
                for pass_ in ("fwd", "fwd+bwd"):
                    if pass_ in e:
                        ref, fast = e[pass_]["reference"], e[pass_]["fast"]
                        first = e.get(f"{pass_}_first_call_fast_s")
                        lines.append(f"| {op} ({e['reference_impl']} vs {e['fast_impl']}) | {pass_} | {_ms(ref)} | "
                                     f"{_ms(fast)} | {ref.get('ratio_to_baseline', '')} | "
                                     f"{'' if first is None else f'{first} s'} |")
    if report["not_covered_by_dry_run"]:
        lines += ["", "## What a dry run cannot cover", ""]
        lines += [f"- {k}: {v}" for k, v in report["not_covered_by_dry_run"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu-report")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no nvcc build")
    ap.add_argument("--official-mae", default=None, metavar="PATH",
                    help="a clone of facebookresearch/mae: adds its models_mae.py (needs timm)")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: one stage body
    ap.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.stage:
        return _stage_main(args)

    import torch

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; `--dry-run` runs the harness on CPU", file=sys.stderr)
    facts = _facts()
    deadline = time.monotonic() + args.total_budget
    stages = []
    for name in STAGES:
        budget, _ = STAGES[name]
        left = deadline - time.monotonic()
        if name not in args.stages:
            stages.append(dict(name=name, status="not asked", note="--stages left it out"))
            continue
        if name != "lane" and left < MIN_STAGE_S:
            stages.append(dict(name=name, status="skipped", budget_s=budget,
                               note=f"total budget spent ({left:.0f} s left of {args.total_budget:.0f})"))
            continue
        # the lane must complete: it gets its whole budget; each later stage at most what is left
        budget = DRY_RUN_STAGE_S if args.dry_run else budget if name == "lane" else min(budget, left)
        print(f"gpu-check: {name} (budget {budget:.0f} s) ...", flush=True)
        if name == "build":
            entry = run_build(args, budget)
        elif name == "lane":
            entry = run_lane(args, budget)
        else:
            entry = run_measure(args, name, budget)
        entry = dict(name=name, budget_s=round(budget), **entry)
        stages.append(entry)
        print(f"gpu-check: {name}: {entry['status']} in {entry.get('seconds')} s. {entry.get('note', '')}"[:400],
              flush=True)
        write_report(args, facts, stages, started)  # a killed run still leaves a report
    write_report(args, facts, stages, started)
    print(f"gpu-check: report in {args.out}/report.md")
    status = {s["name"]: s["status"] for s in stages}
    ok_build = status.get("build") in ("ok", "not run (dry run)", "not asked")
    ok_lane = status.get("lane") in ("ok", "not run (dry run)", "not asked")
    if not (ok_build and ok_lane):
        return 1
    later = [s for s in stages if s["name"] not in ("build", "lane")]
    return 2 if any(s["status"] in ("failed", "timeout") for s in later) else 0


def _stage_main(args):
    import torch

    sys.path[:0] = [ROOT, BENCHMARKS]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 3
    plan = PLAN[args.dry_run]
    args.stage_key = args.stage
    body = stage_ops if args.stage == "ops" else stage_train
    result = body(args, device, plan)
    with open(args.stage_out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
