"""dragonctl: drag-style image edits with DragonDiffusion / DiffEditor, declared in YAML specs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`dragonctl.Editor` loads torch and diffusers only when first used: `import dragonctl`
    (and `dragonctl --help`) stay light."""
    if name == "Editor":
        from dragonctl.notebook import Editor

        return Editor
    raise AttributeError(f"module 'dragonctl' has no attribute {name!r}")
