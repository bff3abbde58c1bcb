"""`python -m benchmarks.quality [OUT_DIR] [--cases N]`: the same as `dragonctl bench quality`."""

from dragonctl.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "quality", *sys.argv[1:]])
