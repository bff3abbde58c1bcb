"""dragonctl: drag-style image edits with DragonDiffusion / DiffEditor, declared in YAML specs."""

__version__ = "0.1.0"
