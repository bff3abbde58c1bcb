"""Cross-branch self-attention in the UNet decoder: the generation branch reads the memory bank's K/V.

The memory bank's K/V are never stored: at each edit step the bank rows (the source's inverted latent
for this step, and for two-image modes the placed reference's) run in the same batch as the
generation rows, so each decoder self-attention layer computes the bank's K/V and the generation rows
use them right away. This reproduces the reference's inversion-time K/V exactly (same latent, same
timestep, same prompt) without the gigabytes of host RAM it re-uploads every step.

Batch layout during an injected forward: rows [0, n_bank) are bank rows (plain self-attention), the
rest are generation rows whose K/V are replaced, concatenated or composited.

The alternative, `kv_bank: stored`, records the bank's K/V per layer and step in one pass before the
loop (`BankState.record`) and then reads them (`BankState.stored`) with no bank rows in the batch;
both give the same result. Recomputing is the default (see README, "Benchmarks").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class BankState:
    """What the processors do on the next forward; the sampler sets it before each UNet call."""

    mode: str = "off"  # off | replace | concat | composite
    n_bank: int = 0
    step: int = 0
    record: dict | None = None  # when set, every layer saves its K/V here under (layer, step)
    stored: dict | None = None  # when set, the bank's K/V come from here instead of bank rows
    latent_hw: tuple[int, int] = (0, 0)
    # composite only: working-size masks; token masks are derived per layer resolution
    base_keep: torch.Tensor | None = None  # tokens of the source bank row to keep (outside the object)
    ref_keep: torch.Tensor | None = None  # tokens of the reference bank row to keep (the object)
    # composite with regional attention: generation queries inside this region read only the
    # reference object's tokens, the others only the source's kept tokens (None: one shared set)
    query_region: torch.Tensor | None = None
    _token_masks: dict = field(default_factory=dict)

    def token_masks(self, n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(source token indices kept, reference token indices kept, generation queries' attention mask or None).

        Computed on the host from the working-size masks; `prepare` fills them before the loop, so
        the forward only indexes with fixed-size index tensors (static shapes, no syncs, no graph breaks).
        """
        if n_tokens not in self._token_masks:
            h, w = self.latent_hw
            f = math.sqrt(h * w / n_tokens)
            hh, ww = round(h / f), round(w / f)

            def at_layer(m: torch.Tensor, at_least_one: bool) -> torch.Tensor:
                cov = F.interpolate(m[None, None].float().cpu(), size=(hh, ww), mode="area")[0, 0].flatten()
                r = cov >= 0.5
                if at_least_one and not r.any():  # a tiny object can vanish at coarse layers: keep its best cell
                    r = cov == cov.max()
                return r

            assert self.base_keep is not None and self.ref_keep is not None
            base, ref = at_layer(self.base_keep, False), at_layer(self.ref_keep, True)
            allowed = None
            if self.query_region is not None and base.any():
                inside = at_layer(self.query_region, False)
                # rows: queries; columns: [kept source tokens ; kept reference tokens]
                allowed = torch.cat([(~inside)[:, None].expand(-1, int(base.sum())),
                                     inside[:, None].expand(-1, int(ref.sum()))], dim=1).to(device)
            self._token_masks[n_tokens] = (base.nonzero().flatten().to(device), ref.nonzero().flatten().to(device), allowed)
        return self._token_masks[n_tokens]

    def reset(self) -> None:
        """Back to plain attention with no masks (the start of every edit)."""
        self.mode, self.n_bank, self.step = "off", 0, 0
        self.record = self.stored = None
        self.latent_hw = (0, 0)
        self.base_keep = self.ref_keep = self.query_region = None
        self._token_masks.clear()

    def prepare(self, device: torch.device, levels: int = 4) -> None:
        """Fill the token index cache for every decoder resolution (latent size halved up to `levels` - 1 times)."""
        self._token_masks.clear()
        if self.base_keep is None or self.ref_keep is None:
            return
        h, w = self.latent_hw
        for k in range(levels):
            if h % 2**k == 0 and w % 2**k == 0:
                self.token_masks((h >> k) * (w >> k), device)


class MemoryBankAttnProcessor:
    """Self-attention that can swap in the bank rows' K/V for the generation rows (SDPA inside)."""

    def __init__(self, state: BankState, name: str = "") -> None:
        self.state = state
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = self._attend(attn, q, k, v, attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

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
                return _sdpa(attn, q, k, v, mask)
            kb, vb = k[:nb], v[:nb]
        n_gen = q.shape[0] - nb
        gen_mask = None
        if s.mode == "replace":
            k_gen, v_gen = kb[:1].expand(n_gen, -1, -1), vb[:1].expand(n_gen, -1, -1)
        elif s.mode == "concat":
            k_gen = torch.cat([k[nb:], kb[:1].expand(n_gen, -1, -1)], dim=1)
            v_gen = torch.cat([v[nb:], vb[:1].expand(n_gen, -1, -1)], dim=1)
        elif s.mode == "composite":
            base_keep, ref_keep, allowed = s.token_masks(k.shape[1], k.device)
            k_c = torch.cat([kb[0].index_select(0, base_keep), kb[1].index_select(0, ref_keep)], dim=0)[None]
            v_c = torch.cat([vb[0].index_select(0, base_keep), vb[1].index_select(0, ref_keep)], dim=0)[None]
            k_gen, v_gen = k_c.expand(n_gen, -1, -1), v_c.expand(n_gen, -1, -1)
            gen_mask = allowed
        else:
            raise ValueError(f"unknown bank mode {s.mode!r}")
        gen = _sdpa(attn, q[nb:], k_gen, v_gen, gen_mask)
        if nb == 0:
            return gen
        return torch.cat([_sdpa(attn, q[:nb], k[:nb], v[:nb], None), gen], dim=0)


def _sdpa(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    b = q.shape[0]
    heads = attn.heads
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class BankControl:
    """Installs the processors on a bundle's decoder self-attention layers and restores the old ones.

    One control per `Editor`, entered once per edit: its processors and state are the same objects
    every time, so a compiled UNet forward sees an unchanged module and keeps its graphs.
    """

    def __init__(self, unet: torch.nn.Module, layer_names: list[str]) -> None:
        self.unet = unet
        self.layer_names = layer_names
        self.state = BankState()
        self.processors = {name: MemoryBankAttnProcessor(self.state, name) for name in layer_names}
        self._saved: dict | None = None

    def __enter__(self) -> BankState:
        procs = dict(self.unet.attn_processors)
        self._saved = dict(procs)
        procs.update(self.processors)
        self.unet.set_attn_processor(procs)
        self.state.reset()
        return self.state

    def __exit__(self, *exc) -> None:
        self.state.reset()
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None
