"""Triton 3.6's interpreter with numpy >= 2.4: a runtime loop bound (``for start in range(0,
total, BLOCK)``, ``total`` a kernel argument) fails with ``TypeError: only 0-dimensional arrays
can be converted to Python scalars``. The interpreter holds a scalar argument as a 1-element
array and its ``tensor.__index__`` is ``int(self.handle.data)``, which numpy 2.4 refuses for
arrays of one dimension; triton 3.7+ squeezes the array first. ``apply()`` gives triton 3.6's
interpreter that same ``__index__``.

Only the interpreter (TRITON_INTERPRET=1, CPU tensors: the tests) is touched, and only on a
triton that has the bug; compiled kernels are not affected in any way (same PTX, registers and
spills: tools/triton_aot.py). The kernels keep their ``range(runtime bound)`` loops, which the
compiler software-pipelines; a ``while`` loop instead would have lost that.
"""
import triton


def _has_the_bug() -> bool:
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return version < (3, 7)


def apply() -> None:
    """Idempotent; a no-op on triton >= 3.7 or where the interpreter's internals differ."""
    if not _has_the_bug():
        return
    try:
        from triton.runtime import interpreter
    except Exception:  # no interpreter in this build: nothing to fix
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mae_fast_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._mae_fast_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
