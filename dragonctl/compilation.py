"""The step loop's two model calls, eager or under `torch.compile`.

`unet_forward` is the full UNet call (inversion, CFG and memory-bank rows); `feature_forward` the
guided steps' truncated forward to the feature stages, compiled with its backward. Shapes are
static: each batch shape is captured once, never once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dragonctl.features import FeatureForward, decoder_features

UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # → fp32 output
# torch.compile modes, plus "cudagraphs": CUDA graphs of the eager kernels (no code generation:
# seconds to build instead of minutes), and "eager": TorchDynamo capture alone (a quick check)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "cudagraphs", "eager")
CUDA_GRAPH_MODES = ("reduce-overhead", "cudagraphs")


def resolve_compile(setting: str, device: torch.device) -> str:
    """`on` means CUDA graphs on a GPU and inductor's default elsewhere; other values are modes."""
    if setting == "on":
        return "reduce-overhead" if device.type == "cuda" else "default"
    return setting


def compile_call(fn: Callable, compile: str, backend: str | Callable = "inductor") -> Callable:
    """`fn` under torch.compile with static shapes (`dynamic=False`).

    Under "reduce-overhead" or "cudagraphs" on CUDA each batch shape becomes a CUDA graph, and
    every call starts a new graph step: the previous call's outputs may be overwritten from then
    on, so callers copy or consume them.
    """
    if compile not in COMPILE_MODES or compile == "off":
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES[1:])}, not {compile!r}")
    if compile in ("eager", "cudagraphs"):
        backend = compile
    # `mode` is an inductor option; other backends (tests use a counting one) take none
    options = {"mode": compile} if backend == "inductor" else {}
    compiled = torch.compile(fn, dynamic=False, backend=backend, **options)

    def call(z: torch.Tensor, *args):
        if z.device.type == "cuda" and compile in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(z, *args)

    return call


# a context at a latent size → the UNet's (encoder_hidden_states, added_cond_kwargs) (SDXL)
Condition = Callable[[torch.Tensor, tuple[int, int]], tuple[torch.Tensor, dict | None]]


def unet_forward(
    unet: torch.nn.Module,
    dtype: torch.dtype,
    compile: str = "off",
    backend: str | Callable = "inductor",
    condition: Condition | None = None,
) -> UNetForward:
    """The full UNet call of the step loop, optionally compiled.

    Timesteps arrive as device tensors: a Python int would make diffusers build a tensor on the
    host and copy it every call (and make torch.compile recompile on every timestep). Compiled
    outputs are copied out of the graph's buffers, which the next replay overwrites.
    """

    def forward(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        added = None
        if condition is not None:
            context, added = condition(context, tuple(z.shape[-2:]))
        return unet(z.to(dtype), t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    if compile == "off":
        return lambda z, t, context: forward(z, t, context).float()
    compiled = compile_call(forward, compile, backend)
    return lambda z, t, context: compiled(z, t, context).to(torch.float32, copy=True)


def feature_forward(
    unet: torch.nn.Module,
    compile: str = "off",
    backend: str | Callable = "inductor",
    condition: Condition | None = None,
) -> FeatureForward:
    """The guided steps' truncated forward (up_blocks 1 and 2), optionally compiled with its
    backward. The features feed the energies and the backward before the next compiled call
    starts a new CUDA-graph step, so they need no copy."""

    def forward(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        added = None
        if condition is not None:
            context, added = condition(context, tuple(z.shape[-2:]))
        return decoder_features(unet, z, t, context, added)

    return forward if compile == "off" else compile_call(forward, compile, backend)
