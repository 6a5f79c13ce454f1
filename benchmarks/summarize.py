"""Markdown summary of a pytest-benchmark JSON file (``--benchmark-json=FILE``): per group,
each case's median and min, and its ratio to the group's ``reference`` (or mae_fast) case.

    .venv/bin/python -m pytest benchmarks -q --benchmark-json=bench.json
    .venv/bin/python benchmarks/summarize.py bench.json
"""
import json
import sys
from collections import defaultdict


def _unit(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def summarize(data) -> str:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    lines = ["| group | case | median | min | rounds | median / baseline |", "|---|---|---:|---:|---:|---:|"]
    for group in sorted(groups):
        cases = groups[group]
        base = next((b for b in cases if " reference " in f" {b['name']} " and "mae_fast" not in b["name"]), None)
        base = base or next((b for b in cases if b["name"].endswith(" mae_fast")), None)
        for b in sorted(cases, key=lambda b: b["stats"]["median"]):
            ratio = f"{b['stats']['median'] / base['stats']['median']:.2f}" if base else "-"
            lines.append(f"| {group.replace('|', '/')} | {b['name']} | {_unit(b['stats']['median'])} | {_unit(b['stats']['min'])} "
                         f"| {b['stats']['rounds']} | {ratio} |")
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "?")
    lines.append(f"\nMachine: {cpu}, {info.get('cpu', {}).get('count', '?')} cores, python "
                 f"{info.get('python_version', '?')}; {data.get('datetime', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(summarize(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
