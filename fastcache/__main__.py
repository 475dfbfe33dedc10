"""``python -m fastcache COMMAND``:

calibrate   calibrate a model or pipeline and search a threshold or a schedule
            (python -m fastcache calibrate --help; same as python -m fastcache.tuning)
generate    sample with and without the cache; print time, computed steps and PSNR
            (python -m fastcache generate --help; fastcache.tuning.generate)
info        the installed backends (python -m fastcache.info)
"""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "calibrate":
        from .tuning.cli import main as calibrate

        return calibrate(rest, prog="python -m fastcache calibrate")
    if cmd == "generate":
        from .tuning.generate import main as generate

        return generate(rest)
    if cmd == "info":
        from .info import main as info

        return info() or 0
    print(f"python -m fastcache: error: unknown command {cmd!r}: one of calibrate, generate, info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
