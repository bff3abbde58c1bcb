"""`python -m benchmarks.speed [options]`: the same as `dragonctl bench speed` (see its --help)."""

from dragonctl.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "speed", *sys.argv[1:]])
