"""Benchmarks: edit quality on the shapes world, speed and memory, DragBench plumbing."""
