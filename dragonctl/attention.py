"""Cross-branch self-attention in the UNet decoder: the generation reads the memory bank's K/V.

The memory bank's K/V are never kept: at each edit step the bank rows (the source's inverted latent
for this step, and for two-image modes the second image's) run in the same batch as the generation
rows, so each decoder self-attention layer computes the bank's K/V and the generation rows use them
right away. This reproduces the inversion-time K/V exactly (same latent, timestep and prompt)
without the gigabytes of host RAM the reference re-uploads every step.

Batch layout while the bank is read: rows [0, n_bank) are bank rows (plain self-attention), the
rest are generation rows whose K/V are replaced, concatenated or composited. A batched loop (several
edits of one source) has each edit's generation rows in turn after the shared bank rows; each edit
reads its own bank images its own way (`BankReading`).

The alternative records the bank's K/V per layer and step in one pass before the loop
(`BankState.recording`) and reads them back with no bank rows in the batch; both give the same
result (a test checks it).

DiffEditor's image prompt lives here too: cross-attention processors that add an IP-Adapter's
image tokens to the generation rows (`ImagePromptControl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

BANK_MODES = ("replace", "concat", "composite")


@dataclass(frozen=True)
class BankAttention:
    """How the generation rows read the memory bank: one choice per edit, made by the mode.

    replace: the first bank row's K/V instead of their own (move by correspondence; a whole copy);
    concat: their own K/V and the source's (drag); composite: the source's tokens outside the
    object and the second image's inside it, as one K/V set (appearance, paste by composite).
    """

    mode: str
    base_keep: np.ndarray | None = None  # composite: source tokens kept (working-size mask)
    ref_keep: np.ndarray | None = None  # composite: second image's tokens kept
    # composite with regional attention: queries in this region read only the second image's
    # tokens, the others only the source's (None: one shared set)
    query_region: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mode not in BANK_MODES:
            raise ValueError(f"unknown bank mode {self.mode!r}")
        if self.mode == "composite" and (self.base_keep is None or self.ref_keep is None):
            raise ValueError("composite attention needs base_keep and ref_keep")


@dataclass(frozen=True)
class BankReading:
    """A run of edits (of a batched loop) whose generation rows read the bank the same way."""

    first: int  # the run's edits: [first, stop)
    stop: int
    attention: BankAttention | None  # None: plain self-attention
    images: tuple[int, ...]  # the bank rows they read: the source's, then their second image's


@dataclass
class BankState:
    """What the processors do on the next forward.

    `configure` sets it up once per loop from each edit's `BankAttention` and bank images;
    `reading(step, n_bank)` switches it on for one forward. Outside `reading` every layer is plain
    self-attention. In a batched loop every edit has the same number of generation rows, in edit
    order after the bank rows.
    """

    mode: str = "off"  # off | reading: this forward's
    n_bank: int = 0  # bank rows at the head of this forward's batch
    step: int = 0
    readings: list[BankReading] = field(default_factory=list)
    n_edits: int = 1
    latent_hw: tuple[int, int] = (0, 0)
    record: dict | None = None  # while recording: every layer saves its K/V under (layer, step)
    stored: dict | None = None  # recorded K/V, read instead of bank rows
    _token_masks: dict = field(default_factory=dict)

    def configure(
        self,
        attention: BankAttention | None | list[tuple[BankAttention | None, tuple[int, ...]]],
        latent_hw: tuple[int, int],
        device: torch.device,
        stored: dict | None = None,
    ) -> None:
        """Set up a loop: one `BankAttention` (one edit reading bank rows 0 and 1), or one
        (attention, bank images) pair per edit of a batched loop. The composite's token indices
        are made here for every decoder resolution (so the forward only indexes with fixed-size
        tensors: no syncs, no graph breaks)."""
        self.reset()
        edits = attention if isinstance(attention, list) else [(attention, (0, 1))]
        self.readings, self.n_edits = _runs(edits), len(edits)
        self.latent_hw, self.stored = latent_hw, stored
        h, w = latent_hw
        for r, reading in enumerate(self.readings):
            if reading.attention is None or reading.attention.mode != "composite":
                continue
            for k in range(4):  # the latent size halved up to three times
                if h % 2**k == 0 and w % 2**k == 0:
                    self.token_masks(r, (h >> k) * (w >> k), device)

    @property
    def attention(self) -> BankAttention | None:
        """The first edit's reading (a single edit's)."""
        return self.readings[0].attention if self.readings else None

    @contextmanager
    def reading(self, step: int, n_bank: int) -> Iterator[None]:
        """One forward in which the generation rows read the bank (its first `n_bank` rows, or
        the recorded K/V when there are none)."""
        assert self.readings, "configure the bank state first"
        self.mode, self.n_bank, self.step = "reading", n_bank, step
        try:
            yield
        finally:
            self.mode, self.n_bank = "off", 0

    @contextmanager
    def recording(self, into: dict, step: int) -> Iterator[None]:
        """One forward of bank rows alone whose K/V every layer saves into `into`."""
        self.record, self.step = into, step
        try:
            yield
        finally:
            self.record = None

    def token_masks(
        self, run: int, n_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(source token indices kept, second image's token indices kept, the generation
        queries' attention mask or None) of reading run `run` at the layer with `n_tokens`
        tokens."""
        key = (run, n_tokens)
        if key not in self._token_masks:
            a = self.readings[run].attention
            assert a is not None and a.base_keep is not None and a.ref_keep is not None
            h, w = self.latent_hw
            f = math.sqrt(h * w / n_tokens)
            hw = round(h / f), round(w / f)
            base, ref = _at_layer(a.base_keep, hw, False), _at_layer(a.ref_keep, hw, True)
            allowed = None
            if a.query_region is not None and base.any():
                inside = _at_layer(a.query_region, hw, False)
                # rows: queries; columns: [kept source tokens ; kept second-image tokens]
                allowed = torch.cat(
                    [
                        (~inside)[:, None].expand(-1, int(base.sum())),
                        inside[:, None].expand(-1, int(ref.sum())),
                    ],
                    dim=1,
                ).to(device)
            self._token_masks[key] = (
                base.nonzero().flatten().to(device),
                ref.nonzero().flatten().to(device),
                allowed,
            )
        return self._token_masks[key]

    def reset(self) -> None:
        """Back to plain attention with nothing configured (the start and end of every edit)."""
        self.mode, self.n_bank, self.step = "off", 0, 0
        self.readings, self.n_edits = [], 1
        self.record, self.stored = None, None
        self.latent_hw = (0, 0)
        self._token_masks.clear()


def _runs(edits: list[tuple[BankAttention | None, tuple[int, ...]]]) -> list[BankReading]:
    """Neighbouring edits that read the same bank images the same way share one attention call
    (replace and concat carry no per-edit data; a composite's token masks are its own)."""
    runs: list[BankReading] = []
    for k, (attention, images) in enumerate(edits):
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.images == images
            and (last.attention is attention or _same_plain_reading(last.attention, attention))
        ):
            runs[-1] = BankReading(last.first, k + 1, last.attention, images)
        else:
            runs.append(BankReading(k, k + 1, attention, images))
    return runs


def _same_plain_reading(a: BankAttention | None, b: BankAttention | None) -> bool:
    return a is not None and b is not None and a.mode == b.mode and a.mode != "composite"


def _at_layer(mask: np.ndarray, hw: tuple[int, int], at_least_one: bool) -> torch.Tensor:
    """A working-size mask as flat tokens of a layer: half-covered cells."""
    m = torch.from_numpy(np.ascontiguousarray(mask))
    cov = F.interpolate(m[None, None].float(), size=hw, mode="area")[0, 0].flatten()
    r = cov >= 0.5
    if (
        at_least_one and not r.any()
    ):  # a tiny object can vanish at coarse layers: keep its best cell
        r = cov == cov.max()
    return r


class MemoryBankAttnProcessor:
    """Self-attention that can swap in the bank rows' K/V for the generation rows (SDPA inside)."""

    def __init__(self, state: BankState, name: str = "") -> None:
        self.state = state
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        return attention_forward(
            attn,
            hidden_states,
            encoder_hidden_states,
            temb,
            lambda q, k, v: self._attend(attn, q, k, v, attention_mask),
        )

    def _attend(self, attn, q, k, v, mask) -> torch.Tensor:
        s = self.state
        if s.record is not None:
            s.record[(self.name, s.step)] = (k.detach(), v.detach())
        if s.stored is not None and s.mode != "off":
            nb = 0
            kb, vb = s.stored[(self.name, s.step)]
        else:
            nb = s.n_bank
            if s.mode == "off" or nb == 0 or q.shape[0] <= nb:
                return sdpa(attn, q, k, v, mask)
            kb, vb = k[:nb], v[:nb]
        per_edit = (q.shape[0] - nb) // s.n_edits
        outs = []
        for run, reading in enumerate(s.readings):
            rows = slice(nb + reading.first * per_edit, nb + reading.stop * per_edit)
            k_gen, v_gen, gen_mask = self._bank_kv(s, run, reading, k[rows], v[rows], kb, vb)
            outs.append(sdpa(attn, q[rows], k_gen, v_gen, gen_mask))
        gen = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        if nb == 0:
            return gen
        return torch.cat([sdpa(attn, q[:nb], k[:nb], v[:nb], None), gen], dim=0)

    @staticmethod
    def _bank_kv(s: BankState, run: int, reading: BankReading, k, v, kb, vb):
        """The K/V (and attention mask) a run of generation rows reads, given their own K/V."""
        n = k.shape[0]
        a = reading.attention
        src = reading.images[0]
        if a is None:
            return k, v, None
        if a.mode == "replace":
            return kb[src : src + 1].expand(n, -1, -1), vb[src : src + 1].expand(n, -1, -1), None
        if a.mode == "concat":
            k_gen = torch.cat([k, kb[src : src + 1].expand(n, -1, -1)], dim=1)
            v_gen = torch.cat([v, vb[src : src + 1].expand(n, -1, -1)], dim=1)
            return k_gen, v_gen, None
        if a.mode == "composite":
            second = reading.images[1]
            base_keep, ref_keep, allowed = s.token_masks(run, k.shape[1], k.device)

            def kept(t: torch.Tensor) -> torch.Tensor:
                own = [t[src].index_select(0, base_keep), t[second].index_select(0, ref_keep)]
                return torch.cat(own)[None].expand(n, -1, -1)

            return kept(kb), kept(vb), allowed
        raise ValueError(f"unknown bank mode {a.mode!r}")


def attention_forward(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    temb: torch.Tensor | None,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """diffusers' attention around a custom `attend(q, k, v)` (B×N×C each, heads not split):
    the norms, projections, output layer and residual of its default processor."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states)
    else:
        context = encoder_hidden_states
    out = attend(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def sdpa(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Scaled dot-product attention over `attn.heads` heads of B×N×C projections."""
    b = q.shape[0]
    heads = attn.heads
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class ProcessorSwap:
    """Installs `processors` over the UNet's own on entry and restores the old ones on exit (a
    control's processors and state are the same objects every edit, so a compiled UNet forward
    sees an unchanged module and keeps its graphs)."""

    def __init__(self, unet: torch.nn.Module, processors: dict) -> None:
        self.unet, self.processors = unet, processors
        self._saved: dict | None = None

    def install(self) -> None:
        procs = dict(self.unet.attn_processors)
        self._saved = dict(procs)
        procs.update(self.processors)
        self.unet.set_attn_processor(procs)

    def restore(self) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None


class BankControl(ProcessorSwap):
    """Installs the processors on the decoder's self-attention layers; restores the old ones.
    One control per `Editor`, entered once per edit."""

    def __init__(self, unet: torch.nn.Module, layer_names: list[str]) -> None:
        self.state = BankState()
        procs = {name: MemoryBankAttnProcessor(self.state, name) for name in layer_names}
        super().__init__(unet, procs)

    def __enter__(self) -> BankState:
        self.install()
        self.state.reset()
        return self.state

    def __exit__(self, *exc) -> None:
        self.state.reset()
        self.restore()


# ---------------------------------------------------------------------------------------------
# the image prompt (DiffEditor): cross-attention to an IP-Adapter's image tokens


@dataclass
class ImagePromptState:
    """What the cross-attention processors add on the next forward (nothing outside `prompting`)."""

    tokens: torch.Tensor | None = None  # one row per generation row
    scale: float = 0.0
    n_skip: int = 0  # bank rows at the head of the batch: plain cross-attention

    @contextmanager
    def prompting(self, tokens: torch.Tensor, scale: float, n_skip: int) -> Iterator[None]:
        self.tokens, self.scale, self.n_skip = tokens, scale, n_skip
        try:
            yield
        finally:
            self.tokens, self.scale, self.n_skip = None, 0.0, 0


class ImagePromptAttnProcessor:
    """Cross-attention to the text, plus scale · attention to the image tokens for the
    generation rows while the state is prompting: out = Attn(Q, K_text, V_text) + scale ·
    Attn(Q, K_ip, V_ip) (the reference's `IPAttnProcessor`, DiffEditor Eq. 5). Bank rows, time
    travel's re-noise calls, the inversion and the guidance features never see the image tokens,
    as in the reference."""

    def __init__(
        self, state: ImagePromptState, to_k_ip: torch.nn.Module, to_v_ip: torch.nn.Module
    ) -> None:
        self.state, self.to_k_ip, self.to_v_ip = state, to_k_ip, to_v_ip

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = sdpa(attn, q, k, v, attention_mask)
            s = self.state
            if s.tokens is None:
                return out
            n = s.n_skip
            k_ip, v_ip = self.to_k_ip(s.tokens), self.to_v_ip(s.tokens)
            prompted = out[n:] + s.scale * sdpa(attn, q[n:], k_ip, v_ip, None)
            return torch.cat([out[:n], prompted]) if n else prompted

        return attention_forward(attn, hidden_states, encoder_hidden_states, temb, attend)


class ImagePromptControl(ProcessorSwap):
    """Installs an adapter's processors on the cross-attention layers; restores the old ones."""

    def __init__(self, unet: torch.nn.Module, adapter) -> None:
        """`adapter`: an `image_prompt.ImagePromptAdapter` (its per-layer K/V projections)."""
        self.adapter = adapter
        self.state = ImagePromptState()
        procs = {
            name: ImagePromptAttnProcessor(self.state, k, v)
            for name, (k, v) in adapter.key_value.items()
        }
        super().__init__(unet, procs)

    def __enter__(self) -> ImagePromptState:
        self.install()
        return self.state

    def __exit__(self, *exc) -> None:
        self.restore()
