"""The static kernel report (tools/kernel_report.py): its parsers on hand-written cuobjdump
output, and every GPU kernel of this build compiled/read without a GPU, failing on a spill."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("kernel_report", os.path.join(ROOT, "tools", "kernel_report.py"))
kernel_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_report)

RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z3fooPf:
  REG:40 STACK:16 SHARED:2112 LOCAL:0 CONSTANT[0]:424 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z3fooPf:
  REG:44 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:424 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_90
		Function : _Z3fooPf
        /*0010*/                   LDG.E.128.CONSTANT R16, desc[UR4][R18.64] ;      /* 0x0 */
        /*0020*/              @!P1 LDG.E.U16.CONSTANT R19, desc[UR4][R18.64] ;      /* 0x0 */
        /*0030*/                   LDG.E.64.CONSTANT R26, desc[UR4][R22.64] ;       /* 0x0 */
        /*0040*/               @P0 STG.E.128 desc[UR4][R28.64], R4 ;               /* 0x0 */
        /*0050*/                   STL.64 [R1], R2 ;                                /* 0x0 */
        /*0060*/                   LDL.64 R2, [R1] ;                                /* 0x0 */
        /*0070*/                   STG.E [R4.64], R7 ;                              /* 0x0 */
"""


def test_parse_resource_usage():
    res = kernel_report.parse_resource_usage(RESOURCE_USAGE)
    assert res[("sm_80", "_Z3fooPf")]["REG"] == 40
    assert res[("sm_80", "_Z3fooPf")]["STACK"] == 16
    assert res[("sm_80", "_Z3fooPf")]["SHARED"] == 2112
    assert res[("sm_90", "_Z3fooPf")]["REG"] == 44
    assert len(res) == 2


def test_parse_sass_counts_128_bit_accesses_and_spill_code():
    # "arch = sm_90" is what cuobjdump prints before each ELF; the parser keys on it
    code = kernel_report.parse_sass("arch = sm_90\n" + SASS)
    assert code[("sm_90", "_Z3fooPf")] == dict(ld128=1, st128=1, ldl=1, stl=1)


def test_has_spill():
    row = dict(spills=0, local=0)
    assert not kernel_report.has_spill(row)
    assert kernel_report.has_spill(dict(row, spills=8))
    assert kernel_report.has_spill(dict(row, local=16))
    assert not kernel_report.has_spill(dict(row, local=None))  # Triton rows: ptxas spills only


def _rows(make):
    try:
        return make()
    except kernel_report.Unavailable as e:
        pytest.skip(str(e))


def test_triton_kernels_compile_for_every_arch_without_spills():
    rows = _rows(kernel_report.triton_rows)
    assert rows, "tools/triton_aot.py compiled no kernel"
    archs = {r["arch"].rstrip("a") for r in rows}
    assert archs == {"sm_80", "sm_90", "sm_100"}
    for kernel in {r["kernel"] for r in rows}:  # every kernel on every arch
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == {r["arch"] for r in rows}
    spilled = [r for r in rows if kernel_report.has_spill(r)]
    assert not spilled, f"Triton kernels spill: {spilled}"
    assert all(r["registers"] > 0 for r in rows)


def test_cuda_kernels_of_the_extension_do_not_spill():
    rows = _rows(kernel_report.cuda_rows)
    assert rows, "the extension holds CUDA code but no kernel was found in it"
    spilled = [r for r in rows if kernel_report.has_spill(r)]
    assert not spilled, f"CUDA kernels spill: {spilled}"
    assert all(r["registers"] > 0 for r in rows)
    # the fast path's vectorised variants do issue 128-bit global accesses
    assert any(r["ld128"] > 0 for r in rows) and any(r["st128"] > 0 for r in rows)
