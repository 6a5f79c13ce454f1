"""Static report of every GPU kernel of mae_fast, no GPU needed: registers, spills, shared memory
and 128-bit global loads/stores.

  * Triton kernels: AOT-compiled for sm_80 / sm_90 / sm_100 by ``tools/triton_aot.py`` (with the
    arguments their launchers pass at ViT-L/16, batch 256) and read with ``ptxas -v``; 128-bit
    accesses are ``ld/st.global.v4.b32`` (or ``.v2.b64``) in the PTX.
  * CUDA kernels of ``mae_fast._C``: read from the built ``.so`` with ``cuobjdump
    --dump-resource-usage`` (REG, STACK, LOCAL, SHARED) and ``cuobjdump -sass`` (``LDG.E.128`` /
    ``STG.E.128``; spill code is ``STL`` / ``LDL``), for every architecture compiled in
    (``TORCH_CUDA_ARCH_LIST``).

    .venv/bin/python tools/kernel_report.py            # print the table; exit 1 on any spill
    .venv/bin/python tools/kernel_report.py --json
    .venv/bin/python tools/kernel_report.py --write-doc  # also into docs/PERFORMANCE.md

cuobjdump: ``$CUDA_HOME/bin``, then ``PATH``, then the copy bundled with triton.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_AOT = os.path.join(ROOT, "tools", "triton_aot.py")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
BEGIN, END = "<!-- kernel_report begin -->", "<!-- kernel_report end -->"
TRITON_ARCHS = (80, 90, 100)


class Unavailable(Exception):
    """This part of the report cannot be made here (the reason is the message)."""


# ---- Triton ------------------------------------------------------------------------------------

def _triton_aot():
    """tools/triton_aot.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("mae_fast_tools_triton_aot", TRITON_AOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def triton_rows(archs=TRITON_ARCHS) -> List[Dict]:
    if not os.path.isfile(TRITON_AOT):
        raise Unavailable(f"{os.path.relpath(TRITON_AOT, ROOT)} is missing")
    try:
        import triton  # noqa: F401
    except Exception as e:
        raise Unavailable(f"triton is not importable ({type(e).__name__}: {e})")
    out = []
    for r in _triton_aot().rows(tuple(archs)):
        out.append(dict(source="triton", kernel=r["kernel"], config=r.get("config", ""), arch=r["arch"],
                        registers=r["registers"], spills=r["spills"], shared=r["shared"],
                        local=None, ld128=r["ld128"], st128=r["st128"]))
    return out


# ---- CUDA (_C) ---------------------------------------------------------------------------------

def find_cuobjdump() -> str:
    candidates = []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(which)
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise Unavailable("no cuobjdump found (CUDA_HOME/bin, PATH, or triton's bundled copy)")


def find_extension() -> str:
    spec = importlib.util.find_spec("mae_fast._C")
    if spec is None or not spec.origin:
        raise Unavailable("mae_fast._C is not built")
    return spec.origin


_RES_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES_VALS = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")
_ARCH = re.compile(r"^\s*arch = (sm_\w+)")
_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_MEM = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)\b")


def parse_resource_usage(text: str) -> Dict[Tuple[str, str], Dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {(arch, mangled name): {REG, STACK, SHARED, LOCAL}}."""
    out, arch, func = {}, None, None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _RES_FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            out[(arch, func)] = {k: int(v) for k, v in _RES_VALS.findall(line)}
            func = None
    return out


def parse_sass(text: str) -> Dict[Tuple[str, str], Dict[str, int]]:
    """``cuobjdump -sass`` -> {(arch, mangled name): {ld128, st128, ldl, stl}}: 128-bit global
    loads/stores and local-memory loads/stores (spill code) per function."""
    out, arch, func = {}, None, None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _SASS_FUNC.match(line)
        if m:
            func = m.group(1)
            out[(arch, func)] = dict(ld128=0, st128=0, ldl=0, stl=0)
            continue
        if func is None:
            continue
        for op, suffix in _SASS_MEM.findall(line.split(";")[0]):
            counts = out[(arch, func)]
            if op in ("LDL", "STL"):
                counts[op.lower()] += 1
            elif ".128" in suffix + ".":
                counts["ld128" if op == "LDG" else "st128"] += 1
    return out


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    pretty = res.stdout.splitlines() if res.returncode == 0 else names
    out = {}
    for mangled, name in zip(names, pretty):
        name = name.replace("(anonymous namespace)::", "")
        name = name.split("(")[0]  # drop the parameter list
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\b(mae_fast::\w+::|c10::|at::)", "", name)
        out[mangled] = name
    return out


def cuda_rows(so_path: Optional[str] = None) -> List[Dict]:
    so_path = so_path or find_extension()
    tool = find_cuobjdump()
    elves = subprocess.run([tool, "--list-elf", so_path], capture_output=True, text=True)
    if elves.returncode != 0 or "ELF file" not in elves.stdout:
        raise Unavailable(f"{os.path.basename(so_path)} holds no CUDA kernels (built without CUDA)")
    usage = subprocess.run([tool, "--dump-resource-usage", so_path], capture_output=True, text=True, check=True)
    sass = subprocess.run([tool, "-sass", so_path], capture_output=True, text=True, check=True)
    res, code = parse_resource_usage(usage.stdout), parse_sass(sass.stdout)
    names = _demangle(sorted({f for _, f in res}))
    rows = []
    for (arch, func), r in sorted(res.items(), key=lambda kv: (names[kv[0][1]], kv[0][0])):
        c = code.get((arch, func), dict(ld128=0, st128=0, ldl=0, stl=0))
        rows.append(dict(source="cuda", kernel=names[func], config="", arch=arch,
                         registers=r.get("REG", 0), spills=c["ldl"] + c["stl"],
                         shared=r.get("SHARED", 0), local=r.get("LOCAL", 0) + r.get("STACK", 0),
                         ld128=c["ld128"], st128=c["st128"]))
    return rows


# ---- report ------------------------------------------------------------------------------------

def collect(archs=TRITON_ARCHS) -> Tuple[List[Dict], List[str]]:
    """(rows, notes): notes say which part could not be made here and why."""
    rows, notes = [], []
    for name, make in (("Triton", lambda: triton_rows(archs)), ("CUDA (_C)", cuda_rows)):
        try:
            rows += make()
        except Unavailable as e:
            notes.append(f"{name}: not reported: {e}")
    return rows, notes


def has_spill(row: Dict) -> bool:
    return row["spills"] > 0 or bool(row.get("local"))


def table(rows: List[Dict]) -> str:
    lines = ["| source | kernel | launch / config | arch | registers | spills | local+stack (B) "
             "| shared (B) | 128-bit ld | 128-bit st |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        spills = f"{r['spills']} B" if r["source"] == "triton" else f"{r['spills']} LDL/STL"
        local = "-" if r.get("local") is None else str(r["local"])
        lines.append(f"| {r['source']} | `{r['kernel']}` | {r['config']} | {r['arch']} | {r['registers']} "
                     f"| {spills} | {local} | {r['shared']} | {r['ld128']} | {r['st128']} |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    _triton_aot().replace_doc_block(DOC, BEGIN, END, text, "Performance")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(map(str, TRITON_ARCHS)), help="Triton targets")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-doc", action="store_true", help=f"write the table into {DOC}")
    args = ap.parse_args(argv)
    rows, notes = collect(tuple(int(a) for a in args.archs.split(",")))
    spilled = [r for r in rows if has_spill(r)]
    if args.json:
        print(json.dumps(dict(rows=rows, notes=notes)))
    else:
        text = table(rows) + "".join(f"\n\n{n}" for n in notes)
        text += f"\n\n{len(rows)} kernel builds, {len(spilled)} with spills."
        print(text)
        if args.write_doc:
            write_doc(text)
    return 1 if spilled else 0


if __name__ == "__main__":
    # a fallback for `import mae_fast` only: an installed mae_fast (with its mae_fast.kernels, which
    # exists only once installed) must win over the checkout's mae_fast/ (CI's compat lane)
    sys.path.append(ROOT)
    sys.exit(main())
