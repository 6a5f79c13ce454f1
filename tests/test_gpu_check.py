"""``tools/gpu_check.py --dry-run``: the GPU check's whole harness (stages as subprocesses,
budgets, the lane's junit parsing, timing loops over the benchmark contenders and op cases, the
report) on CPU with tiny shapes, so `make gpu-check` cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402


def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k not in ("MAE_FAST_TEST_DEVICE", "TRITON_INTERPRET")}
    # train_l16 is train_b16's code at another size (the same tiny model in a dry run): left out
    stages = ["build", "lane", "train_b16", "ops", "compiled"]
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out), "--stages", *stages],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["lane.log", "lane.xml", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert report["dry_run"] and list(stages) == list(gpu_check.STAGES)
    assert {n: s["status"] for n, s in stages.items()} == {
        "build": "not run (dry run)", "lane": "not run (dry run)",
        "train_b16": "ok", "ops": "ok", "train_l16": "not asked", "compiled": "ok"}
    assert "LOADED True" in stages["build"]["note"]
    # the lane ran in its own process and every CUDA test skipped for want of a GPU
    lane = stages["lane"]
    assert lane["counts"]["passed"] == 0 and lane["counts"]["skipped"] > 0
    assert any("torch.cuda.is_available() is False" in r for r in lane["skip_reasons"])
    for name in ("train_b16", "compiled"):
        contenders = stages[name]["result"]["contenders"]
        assert contenders["mae_fast"]["median_ms"] > 0 and contenders["mae_fast"]["ratio_to_baseline"] == 1.0
    assert "mae_fast-reference" in stages["train_b16"]["result"]["contenders"]
    assert "mae_fast-gemm" in stages["train_b16"]["result"]["contenders"]  # the opt-in path, measured
    ops = stages["ops"]["result"]["ops"]
    assert ops["decoder input"]["fast_impl"] == "c++" and ops["decoder input"]["fwd+bwd"]["fast"]["median_ms"] > 0
    assert "no fused implementation" in ops["masked loss"]["note"]  # Triton: not timed on CPU
    md = (out / "report.md").read_text()
    assert "DRY RUN" in md and "What a dry run cannot cover" in md and "CUDA events" in md
    assert all(f"`{s['command']}`" in md for s in report["stages"] if "command" in s)


@pytest.mark.parametrize("rc, counts, reasons, status", [
    (0, dict(passed=5, failed=0, errors=0, skipped=1), {"xformers is not installed": 1}, "ok"),
    (1, dict(passed=5, failed=1, errors=0, skipped=0), {}, "failed"),
    (2, dict(passed=0, failed=0, errors=0, skipped=0), {}, "failed"),  # collection error
    (0, dict(passed=0, failed=0, errors=0, skipped=9), {"... no GPU visible to torch)": 9}, "skipped"),
    (0, dict(passed=3, failed=0, errors=0, skipped=9), {"CUDA lane: run ...": 9}, "skipped"),
])
def test_lane_status_is_ok_only_when_the_cuda_tests_ran_and_passed(rc, counts, reasons, status):
    assert gpu_check.lane_status(rc, counts, reasons)[0] == status
