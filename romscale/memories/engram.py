"""Engram: hashed n-gram memory (DeepSeek, "Conditional Memory via Scalable Lookup", arXiv
2601.07372; meki.md "Related memories").

At position t, for every n-gram order n (2, 3) and hash head k, the n-gram (x_{t-n+1}, ..., x_t) is
hashed into a table of prime size p_{n,k}:
    mix_n(t) = XOR_{j<n} ((x_{t-j} + 1) * m_j)          odd seeded multipliers; PAD / before start -> 0
    id_{n,k}(t) = mix_n(t) mod p_{n,k}                  heads differ by their distinct prime moduli
and e_t = concat over (n, k) of T[offset_{n,k} + id_{n,k}(t)] (width K * d_head, K = orders x heads).
In each Engram layer (its input hidden state h):
    s_t = <RMSNorm_q(h_t), RMSNorm_k(W_k e_t)> / sqrt(d),  alpha_t = sigmoid(sign(s_t) sqrt(|s_t|))
    v_t = alpha_t * W_v e_t
    Y = SiLU(CausalDepthwiseConv(RMSNorm_c(V))) + V      kernel 4, dilation max(n)
    h <- h + Y                                           before the layer's attention
This follows the official demo (github.com/deepseek-ai/Engram, engram_demo_v1.py) except: no tokenizer
compression (canonical ids) and no mHC branches; one hash (multipliers and moduli) shared by all
Engram layers, so the ROM table packs every layer's row of one hashed id into one contiguous read
(the demo seeds each layer's hash differently); projections without bias.
The rows are addressed by hashed n-gram ids, which depend on the previous n-1 tokens: the shared id
recorder keeps them per batch row across KV-cached decode steps, and each Engram layer keeps the
last (kernel-1) x dilation conv inputs the same way, so cached decoding equals the full forward.
With `zero_init_output` W_v starts at 0: Y = 0 exactly and a retrofitted model keeps its logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from romscale.errors import RomscaleError
from romscale.memories.base import (
    PAD_ID,
    IdRecorder,
    Memory,
    MemoryConfig,
    RowExport,
    decoder_layers,
    family_of,
    join_recorder,
    leave_recorder,
    model_dims,
    register_memory,
)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % q for q in range(2, math.isqrt(n) + 1))


def primes_from(start: int, count: int) -> list[int]:
    """The `count` smallest primes >= start (distinct moduli, one per hash head)."""
    out, n = [], max(2, start)
    while len(out) < count:
        if _is_prime(n):
            out.append(n)
        n += 1
    return out


@dataclass(frozen=True)
class EngramConfig(MemoryConfig):
    """orders: n-gram orders (the paper: 2 and 3). heads: hash heads per order.
    rows_per_head: table size per head; the moduli are the distinct primes from it upwards.
    d_head: width of one head's row (e_t has len(orders) * heads * d_head).
    kernel / dilation: the causal depthwise convolution (dilation None = max(orders)).
    layers: the Engram layers (the paper uses a few early ones; default the second layer)."""

    layers: tuple[int, ...] | None = (1,)
    orders: tuple[int, ...] = (2, 3)
    heads: int = 4
    rows_per_head: int = 1009
    d_head: int = 16
    kernel: int = 4
    dilation: int | None = None
    hash_seed: int = 0
    zero_init_output: bool = True
    init_std: float = 0.02
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is None:
            raise RomscaleError("EngramConfig.layers must name the Engram layers (a few, e.g. [1])")
        object.__setattr__(self, "orders", tuple(int(n) for n in self.orders))
        if not self.orders or any(n < 2 for n in self.orders) or len(set(self.orders)) != len(self.orders):
            raise RomscaleError(f"EngramConfig.orders must be distinct n-gram orders >= 2, got {self.orders!r}")
        self._check_positive("heads", "rows_per_head", "d_head", "kernel")
        if self.dilation is not None:
            self._check_positive("dilation")

    @property
    def n_tables(self) -> int:
        return len(self.orders) * self.heads

    @property
    def moduli(self) -> list[int]:
        return primes_from(self.rows_per_head, self.n_tables)

    @property
    def total_rows(self) -> int:
        return sum(self.moduli)

    @property
    def conv_dilation(self) -> int:
        return self.dilation or max(self.orders)

    @property
    def history(self) -> int:
        """Past token ids the hashes need: max(orders) - 1."""
        return max(self.orders) - 1


class NgramHasher:
    """Hashed n-gram ids (offset into the concatenated table) for every position of a call."""

    def __init__(self, cfg: EngramConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.hash_seed)
        # Odd multipliers below 2^31: (id + 1) * m stays below 2^62 in int64.
        self.mult = torch.randint(0, 2**30, (max(cfg.orders),), generator=g) * 2 + 1
        mod = torch.tensor(cfg.moduli)
        self.mod = mod
        self.offset = torch.cat([torch.zeros(1, dtype=torch.long), mod.cumsum(0)[:-1]])

    def __call__(self, context: torch.Tensor, keep: int) -> torch.Tensor:
        """context (B, keep + T) ids with PAD_ID before the start -> (B, T, n_tables) row ids."""
        x = (context + 1).clamp(min=0)  # PAD_ID -> 0
        t = context.shape[1] - keep
        out = []
        k = 0
        for n in self.cfg.orders:
            mix = torch.zeros(x.shape[0], t, dtype=torch.long, device=x.device)
            for j in range(n):  # token t - j
                mix = mix ^ (x[:, keep - j : keep - j + t] * int(self.mult[j]))
            for _ in range(self.cfg.heads):
                out.append(mix % int(self.mod[k]) + int(self.offset[k]))
                k += 1
        return torch.stack(out, dim=-1)


class EngramBranch(nn.Module):
    """One Engram layer: table, key/value projections, gate norms, the causal depthwise conv."""

    def __init__(self, cfg: EngramConfig, d_model: int, external: bool) -> None:
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        d_e = cfg.n_tables * cfg.d_head
        self.table = None if external else nn.Embedding(cfg.total_rows, cfg.d_head)
        self.key = nn.Linear(d_e, d_model, bias=False)
        self.value = nn.Linear(d_e, d_model, bias=False)
        self.query_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps)
        self.key_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps)
        self.conv_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps)
        self.conv = nn.Parameter(torch.empty(d_model, 1, cfg.kernel))  # depthwise: one filter per channel
        self.slot = 0
        self._conv_state: torch.Tensor | None = None  # the last (kernel-1)*dilation conv inputs

    @property
    def span(self) -> int:
        return (self.cfg.kernel - 1) * self.cfg.conv_dilation

    def memory_vector(self, row_ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """e_t: (B, T, n_tables * d_head) from the row ids, or from rows read from storage."""
        if rows is None:
            if self.table is None:
                raise RomscaleError("this Engram model reads its table from storage, but no ROM table is connected")
            rows = self.table(row_ids)
        return rows.reshape(*row_ids.shape[:-1], -1)

    def forward(self, h: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, fresh: bool) -> torch.Tensor:
        e = e.to(h.dtype)
        score = (self.query_norm(h) * self.key_norm(self.key(e))).sum(-1, keepdim=True) / math.sqrt(self.d_model)
        score = score.sign() * score.abs().clamp_min(1e-6).sqrt()  # the official demo's stabilised gate
        v = torch.sigmoid(score) * self.value(e)
        v = v * valid.unsqueeze(-1).to(v.dtype)  # padding contributes nothing, now or to later positions
        x = self.conv_norm(v)
        b = x.shape[0]
        if fresh or self._conv_state is None:
            past = x.new_zeros(b, self.span, self.d_model)
        elif self._conv_state.shape[0] != b:
            raise RomscaleError(f"Engram conv state has {self._conv_state.shape[0]} rows, this call {b}: re-run the whole sequence")
        else:
            past = self._conv_state.to(x.dtype)
        xx = torch.cat([past, x], dim=1)  # (B, span + T, d)
        # Kept detached: only a KV-cached continuation reads it, never a backward pass.
        self._conv_state = xx[:, xx.shape[1] - self.span :].detach()
        y = F.conv1d(xx.transpose(1, 2), self.conv, groups=self.d_model, dilation=self.cfg.conv_dilation).transpose(1, 2)
        return F.silu(y) + v


@dataclass
class EngramState:
    cfg: EngramConfig
    layers: list[int]
    external: bool
    hasher: NgramHasher
    row_ids: torch.Tensor | None = None
    rows: Any = None
    row_source: Callable[[torch.Tensor], Any] | None = None  # row ids -> rows, ids.shape + (L, d_head)
    handles: list = field(default_factory=list)  # hook handles, removed by detach

    def layer_rows(self, slot: int) -> torch.Tensor | None:
        if self.rows is not None and not isinstance(self.rows, torch.Tensor):  # a prefetcher's Future
            self.rows = self.rows.result()
        return None if self.rows is None else self.rows[..., slot, :]


STATE_ATTR = "_engram_state"


def engram_state(model: nn.Module) -> EngramState | None:
    return getattr(model, STATE_ATTR, None)


@register_memory
class EngramMemory(Memory):
    name = "engram"
    config_cls = EngramConfig
    foldable = False
    label, state_attr = "Engram", STATE_ATTR
    address = "ngram-hash"

    def attach(self, model: nn.Module, cfg: EngramConfig, *, folded: bool = False, external: bool = False) -> nn.Module:
        self.check_attach(model, cfg)
        fam = family_of(model, "Engram")
        layers = decoder_layers(model, fam)
        idx = cfg.layer_indices(len(layers))
        ref = model.get_input_embeddings().weight
        d = ref.shape[1]
        with torch.device(ref.device):
            for slot, i in enumerate(idx):
                layers[i].engram = EngramBranch(cfg, d, external).to(ref.dtype)
                layers[i].engram.slot = slot
        self._init(model, idx, cfg)
        state = EngramState(cfg=cfg, layers=idx, external=external, hasher=NgramHasher(cfg))
        object.__setattr__(model, STATE_ATTR, state)

        def on_ids(r: IdRecorder) -> None:
            state.row_ids = state.hasher(r.context[:, r.window - cfg.history :], cfg.history)
            state.rows = state.row_source(state.row_ids) if state.row_source is not None else None

        rec = join_recorder(model, self.name, keep=cfg.history, listener=on_ids)
        for i in idx:
            def pre(_m, args, kwargs, branch=layers[i].engram):
                h = args[0] if args else kwargs["hidden_states"]
                e = branch.memory_vector(state.row_ids, state.layer_rows(branch.slot))
                h = h + branch(h, e, rec.valid, rec.fresh)
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            state.handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        model.config.engram = {**cfg.to_dict(), "folded": False, "tables": "external" if external else "inline"}
        return model

    @staticmethod
    @torch.no_grad()
    def _init(model: nn.Module, idx: list[int], cfg: EngramConfig) -> None:
        layers = decoder_layers(model)
        for i in idx:
            b = layers[i].engram
            if b.key.weight.is_meta:
                return
            for p in b.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=cfg.init_std)
            nn.init.normal_(b.conv, std=1.0 / math.sqrt(cfg.kernel))
            if cfg.zero_init_output:
                b.value.weight.zero_()

    def detach(self, model: nn.Module) -> nn.Module:
        state = engram_state(model)
        if state is None:
            raise RomscaleError("this model has no Engram attached")
        for h in state.handles:
            h.remove()
        leave_recorder(model, self.name)
        layers = decoder_layers(model)
        for i in state.layers:
            del layers[i].engram
        object.__delattr__(model, STATE_ATTR)
        delattr(model.config, self.name)
        return model

    def is_attached(self, model: nn.Module) -> bool:
        return engram_state(model) is not None

    def rom_params(self, cfg: EngramConfig, model_config: Any) -> int:
        _, _, layers = model_dims(model_config)
        return len(cfg.layer_indices(layers)) * cfg.total_rows * cfg.d_head

    def rom_param_names(self, model: nn.Module) -> list[str]:
        state = engram_state(model)
        if state is None or state.external:
            return []
        return [f"model.layers.{i}.engram.table.weight" for i in state.layers]

    def size_for_budget(self, rom_params: int, model_config: Any, base: EngramConfig | None = None) -> EngramConfig:
        """Keeps d_head, orders, heads and layers; sizes rows_per_head (primes from it upwards)."""
        base = base or EngramConfig()
        _, _, layers = model_dims(model_config)
        per_row = len(base.layer_indices(layers)) * base.d_head * base.n_tables
        guess = max(2, round(rom_params / per_row))
        # The moduli are the primes from rows_per_head upwards, so the total sits a little above
        # n_tables * rows_per_head: search a window around the guess for the closest total.
        reach = base.n_tables * (int(math.log(guess + 2)) + 2)
        candidates = (replace(base, rows_per_head=r) for r in range(max(2, guess - reach), guess + 2))
        return min(candidates, key=lambda c: abs(self.rom_params(c, model_config) - rom_params))

    def row_layout(self, model: nn.Module) -> tuple[int, int, list[int]]:
        state = engram_state(model)
        return state.cfg.total_rows, state.cfg.d_head, list(state.layers)

    def set_row_source(self, model: nn.Module, source) -> None:
        engram_state(model).row_source = source

    def export_rows(self, model: nn.Module) -> RowExport:
        state = engram_state(model)
        if state is None or state.external:
            raise RomscaleError("Engram rows are exported from a model with its tables in memory")
        layers = decoder_layers(model)
        tables = [layers[i].engram.table.weight.detach() for i in state.layers]
        return RowExport(self.name, tables, list(state.layers), self.address, state.cfg.to_dict())


__all__ = ["PAD_ID", "EngramConfig", "EngramMemory", "NgramHasher", "engram_state", "primes_from"]
