"""The one dispatch point: which implementation runs each op, and why.

Every op registers a *chooser* here; the model asks ``choose(op, device, backend)`` once per
call and runs what it says. ``python -m mae_fast.info`` prints the same choices, so what a user
reads there is what runs.

``backend`` (the model's keyword):
  * ``"reference"`` - the pure-PyTorch oracle (``mae_fast.reference``) for every op;
  * ``"fast"``      - the fused implementation, or a ``RuntimeError`` saying why it cannot run;
  * ``"auto"``      - the fused implementation where it runs on that device, else the reference.
"""
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("auto", "reference", "fast")


@dataclass(frozen=True)
class Choice:
    op: str
    impl: str  # e.g. "reference", "triton", "c++", "sdpa"
    reason: str


# op -> (fast impl name, probe(device) -> (runs: bool, reason: str))
_FAST: Dict[str, Tuple[str, Callable[[torch.device], Tuple[bool, str]]]] = {}
# op -> full chooser(device, backend) -> Choice, for ops with more than two paths (attention)
_CHOOSERS: Dict[str, Callable[[torch.device, str], Choice]] = {}


def register_fast(op: str, impl: str, probe: Callable[[torch.device], Tuple[bool, str]]) -> None:
    """Declare that ``op`` has a fused implementation ``impl`` that runs where ``probe`` says."""
    _FAST[op] = (impl, probe)
    _CACHE.clear()


def register_chooser(op: str, chooser: Callable[[torch.device, str], Choice]) -> None:
    _CHOOSERS[op] = chooser
    _CACHE.clear()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


MIN_CUDA_CAPABILITY = (8, 0)  # the fused kernels are compiled and checked for sm_80 and newer

ROCM_REASON = ("ROCm build of torch (torch.version.hip = {hip}): mae_fast's Triton and CUDA kernels "
               "were never tested on AMD GPUs (and _C's .cu files use inline PTX), so the "
               "reference runs on 'cuda' (HIP) devices")
_rocm_warned = False


def _rocm_reason() -> str:
    """The one message for a ROCm torch, warned once per process; "" on a CUDA/CPU build."""
    global _rocm_warned
    hip = getattr(torch.version, "hip", None)
    if not hip:
        return ""
    reason = ROCM_REASON.format(hip=hip)
    if not _rocm_warned:
        _rocm_warned = True
        warnings.warn(f"mae_fast: {reason}", RuntimeWarning, stacklevel=3)
    return reason


def cuda_capability_ok(device: torch.device) -> Tuple[bool, str]:
    """Whether the GPU ``device`` (its own index: a node may mix GPUs; a bare "cuda" is the
    current GPU) is one the fused kernels are built and checked for: an NVIDIA GPU of sm_80+.
    A ROCm torch (whose AMD GPUs also report a capability, gfx90a as 9.0) never is. Without a
    visible GPU the answer is about what *would* run, so it is yes on a CUDA build."""
    rocm = _rocm_reason()
    if rocm:
        return False, rocm
    if not torch.cuda.is_available():
        return True, ""
    cap = torch.cuda.get_device_capability(device.index)
    if tuple(cap) < MIN_CUDA_CAPABILITY:
        where = "the current GPU" if device.index is None else f"GPU cuda:{device.index}"
        return False, (f"{where}: compute capability {cap[0]}.{cap[1]} is below "
                       f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}")
    return True, ""


def triton_probe(device: torch.device) -> Tuple[bool, str]:
    """Where a Triton kernel runs: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if device.type == "cuda":
        ok, why = cuda_capability_ok(device)
        return (True, "CUDA tensors and triton is importable") if ok else (False, why)
    if device.type == "meta":  # shapes only: the op's fake impl runs (tracing, mae_fast.accounting)
        return True, "meta tensors: the fused op's fake impl runs (shapes only, no kernel)"
    if device.type == "cpu" and triton_interpreting():
        return True, "TRITON_INTERPRET=1 runs the Triton kernel on CPU (slow; for tests)"
    return False, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"


def require_triton(op: str, device: torch.device) -> None:
    """For a custom op's Triton body: RuntimeError saying why it cannot run on ``device``
    (the op's public function would have chosen the reference there)."""
    runs, why = triton_probe(device)
    if not runs:
        raise RuntimeError(f"mae_fast::{op} runs only as a Triton kernel: {why}; "
                           f"use mae_fast.ops.{op}(..., backend='reference')")


def ops() -> Tuple[str, ...]:
    _load_all()
    return tuple(sorted(set(_FAST) | set(_CHOOSERS)))


def choose(op: str, device, backend: str = "auto") -> Choice:
    """The implementation that runs ``op`` on tensors of ``device`` for this ``backend``."""
    device = torch.device(device)
    _load_all()
    if op not in _CHOOSERS:  # choosers (attention) take their own backend names
        check_backend(backend)
    # per device *index* (a node may mix GPUs of different capability; tensors always carry
    # their index, a bare "cuda" asks about the current GPU). Env switches that change the
    # answer are part of the cache key too.
    key = (op, device.type, device.index, backend, os.environ.get("TRITON_INTERPRET"),
           os.environ.get("MAE_FAST_ATTN"), os.environ.get("MAE_FAST_MLP"))
    choice = _CACHE.get(key)
    if choice is None:
        choice = _CACHE[key] = _choose_uncached(op, device, backend)
    return choice


# a plain dict, not functools.lru_cache: torch.compile traces through it without a warning
_CACHE: Dict[tuple, Choice] = {}


def clear_cache() -> None:
    """Forget every choice (after installing xformers, rebuilding _C, or in tests)."""
    _CACHE.clear()


def _choose_uncached(op, device: torch.device, backend) -> Choice:
    if op in _CHOOSERS:
        return _CHOOSERS[op](device, backend)
    if op not in _FAST:
        raise KeyError(f"unknown op {op!r}; known: {sorted(set(_FAST) | set(_CHOOSERS))}")
    if backend == "reference":
        return Choice(op, "reference", "backend='reference' asked for")
    impl, probe = _FAST[op]
    runs, why = probe(device)
    if runs and backend == "auto" and impl == "triton" and device.type == "cpu":
        # the interpreter is exact but slow: "auto" never picks it, "fast" does
        return Choice(op, "reference", "Triton on CPU only runs in the interpreter (tests); "
                                       "backend='fast' runs it")
    if runs:
        return Choice(op, impl, why)
    if backend == "fast":
        raise RuntimeError(f"backend='fast': {op} cannot run {impl} on {device}: {why}")
    return Choice(op, "reference", f"{impl} unavailable: {why}")


def _load_all() -> None:
    # importing the op modules registers them
    from . import ops as _ops  # noqa: F401
