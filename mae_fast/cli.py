"""``mae-fast`` console command: ``mae-fast pretrain ...``, ``mae-fast linprobe ...``,
``mae-fast convert ...``, ``mae-fast info``, ``mae-fast bench-data ...``."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("pretrain", "linprobe", "convert", "info", "bench-data")
    if not argv or argv[0] not in commands:
        print(f"usage: mae-fast {{{','.join(commands)}}} [options]   (mae-fast COMMAND --help)", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from .info import main as run
    elif cmd == "pretrain":
        from .pretrain import main as run
    elif cmd == "bench-data":
        from .bench_data import main as run
    elif cmd == "convert":
        from .convert import main as run
    else:
        from .linprobe import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
