"""``python -m mae_fast.build [--force]``: build ``mae_fast._C`` for the installed torch now.

No download: it compiles the sources shipped in the package against the torch you have, into the
cache the first-use build uses (mae_fast/_jit.py, docs/INSTALL.md), and prints where the library
is. If it cannot (or the build at import failed), it builds again with the compiler's output on
screen and exits 1. A prebuilt ``_C``
(``pip install --no-build-isolation .``) needs nothing: it says so.
"""
import argparse
import sys

from . import _jit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mae_fast.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true",
                        help="build again into the cache, even if a build is there or failed before")
    args = parser.parse_args(argv)
    from . import _ext  # importing mae_fast has loaded (or built) _C already, if it could

    if _ext.SOURCE == "prebuilt" and not args.force:
        print(f"mae_fast._C is prebuilt ({_ext.PATH}): nothing to build")
        return 0
    if _ext.SOURCE == "jit" and not args.force:
        print(f"mae_fast._C is built: {_ext.PATH}")
        return 0
    try:
        library = _jit.build(force=True, verbose=True)
    except _jit.BuildError as e:  # the compiler's output is on screen above: the first line says the rest
        print(f"mae_fast: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"mae_fast._C is built: {library}" + ("" if _ext.LOADED else " (the next `import mae_fast` loads it)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
