"""PLE: Gemma 3n's per-layer embeddings (meki.md "Related memories"; transformers'
models/gemma3n/modeling_gemma3n.py: get_per_layer_inputs, project_per_layer_inputs and the end of
Gemma3nTextDecoderLayer.forward).

Per token x (word embedding E[x], width d; L memory layers, width d_ple):
    Z = RMSNorm_proj(reshape(W_proj E[x] * d^-1/2, (L, d_ple)))         computed at runtime (RAM)
    P = (Z + sqrt(d_ple) * T[x]) / sqrt(2)                              T: [|V|, L * d_ple], in ROM
and after decoder layer l (output h):
    h <- h + RMSNorm_post(W_up (gelu_tanh(W_g h) * P_l))
Gemma adds this to its AltUp side streams; the models here have one stream, so it goes to the layer
output. With `zero_init_output` RMSNorm_post's weight starts at 0: the branch is exactly zero and a
retrofitted model keeps its logits. There is no fold: the projection runs at inference (as in Gemma).
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


@dataclass(frozen=True)
class PleConfig(MemoryConfig):
    """d_ple: width of each layer's per-layer embedding (Gemma 3n E2B uses 256).
    zero_init_output: start RMSNorm_post at 0 so the branch outputs exactly 0.
    layers: decoder layers that get a per-layer input; None means all."""

    d_ple: int = 16
    zero_init_output: bool = True
    init_std: float = 0.02
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("d_ple")


class PleInput(nn.Module):
    """The per-token part, once per token for all layers: T (the ROM table) and the projection."""

    def __init__(self, cfg: PleConfig, d_model: int, vocab_size: int, n_layers: int, external: bool) -> None:
        super().__init__()
        self.cfg, self.n_layers, self.d_model = cfg, n_layers, d_model
        self.table = None if external else nn.Embedding(vocab_size, n_layers * cfg.d_ple)
        self.proj = nn.Linear(d_model, n_layers * cfg.d_ple, bias=False)
        self.proj_norm = nn.RMSNorm(cfg.d_ple, eps=cfg.rms_eps)

    def forward(self, embeds: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """P of shape ids.shape + (layers, d_ple). `rows`: T[x] read from a ROM table instead."""
        shape = (*ids.shape, self.n_layers, self.cfg.d_ple)
        z = self.proj_norm((self.proj(embeds) * self.d_model**-0.5).view(shape))
        if rows is None:
            if self.table is None:
                raise RomscaleError("this PLE model reads its table from storage, but no ROM table is connected")
            rows = self.table(ids)
        t = rows.to(z.dtype).reshape(shape)
        return (z + math.sqrt(self.cfg.d_ple) * t) * 2**-0.5


class PleBranch(nn.Module):
    """What one decoder layer adds: RMSNorm_post(W_up (gelu_tanh(W_g h) * P_l))."""

    def __init__(self, cfg: PleConfig, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, cfg.d_ple, bias=False)
        self.up = nn.Linear(cfg.d_ple, d_model, bias=False)
        self.post_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps)

    def forward(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.post_norm(self.up(F.gelu(self.gate(h), approximate="tanh") * p.to(h.dtype)))


@dataclass
class PleState:
    cfg: PleConfig
    layers: list[int]
    external: bool
    per_layer: torch.Tensor | None = None  # P for the current call
    row_source: Callable[[torch.Tensor], Any] | None = None  # ids -> T rows, ids.shape + (L, d_ple)
    handles: list = field(default_factory=list)  # hook handles, removed by detach


STATE_ATTR = "_ple_state"


def ple_state(model: nn.Module) -> PleState | None:
    return getattr(model, STATE_ATTR, None)


@register_memory
class PleMemory(Memory):
    name = "ple"
    config_cls = PleConfig
    foldable = False
    label, state_attr = "PLE", STATE_ATTR
    address = "token"

    def attach(self, model: nn.Module, cfg: PleConfig, *, folded: bool = False, external: bool = False) -> nn.Module:
        self.check_attach(model, cfg)
        fam = family_of(model, "PLE")
        layers = decoder_layers(model, fam)
        idx = cfg.layer_indices(len(layers))
        embedding = model.get_input_embeddings()
        vocab, d = embedding.weight.shape
        ref = embedding.weight
        with torch.device(ref.device):
            model.ple = PleInput(cfg, d, vocab, len(idx), external).to(ref.dtype)
            for i in idx:
                layers[i].ple = PleBranch(cfg, d).to(ref.dtype)
        self._init(model, idx, cfg)
        state = PleState(cfg=cfg, layers=idx, external=external)
        object.__setattr__(model, STATE_ATTR, state)

        def on_ids(rec: IdRecorder) -> None:
            rows = state.row_source(rec.ids) if state.row_source is not None else None
            if rows is not None and not isinstance(rows, torch.Tensor):  # a prefetcher's Future
                rows = rows.result()
            # E[x] straight from the weight: the embedding module's own hooks (fat) are not PLE's input.
            state.per_layer = model.ple(F.embedding(rec.ids, embedding.weight), rec.ids, rows)

        join_recorder(model, self.name, keep=0, listener=on_ids)
        for slot, i in enumerate(idx):
            def hook(_m, _args, out, slot=slot, branch=layers[i].ple):
                h = out[0] if isinstance(out, tuple) else out
                h = h + branch(h, state.per_layer[..., slot, :])
                return (h, *out[1:]) if isinstance(out, tuple) else h

            state.handles.append(layers[i].register_forward_hook(hook))
        model.config.ple = {**cfg.to_dict(), "folded": False, "tables": "external" if external else "inline"}
        return model

    @staticmethod
    @torch.no_grad()
    def _init(model: nn.Module, idx: list[int], cfg: PleConfig) -> None:
        if model.ple.proj.weight.is_meta:
            return
        mods = [model.ple] + [decoder_layers(model)[i].ple for i in idx]
        for m in mods:
            for name, p in m.named_parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=cfg.init_std)
        if cfg.zero_init_output:
            for m in mods[1:]:
                m.post_norm.weight.zero_()

    def detach(self, model: nn.Module) -> nn.Module:
        state = ple_state(model)
        if state is None:
            raise RomscaleError("this model has no PLE attached")
        for h in state.handles:
            h.remove()
        leave_recorder(model, self.name)
        layers = decoder_layers(model)
        for i in state.layers:
            del layers[i].ple
        del model.ple
        object.__delattr__(model, STATE_ATTR)
        delattr(model.config, self.name)
        return model

    def is_attached(self, model: nn.Module) -> bool:
        return ple_state(model) is not None

    def rom_params(self, cfg: PleConfig, model_config: Any) -> int:
        vocab, _, layers = model_dims(model_config)
        return vocab * cfg.d_ple * len(cfg.layer_indices(layers))

    def rom_param_names(self, model: nn.Module) -> list[str]:
        return ["ple.table.weight"] if ple_state(model) is not None and not ple_state(model).external else []

    def size_for_budget(self, rom_params: int, model_config: Any, base: PleConfig | None = None) -> PleConfig:
        base = base or PleConfig()
        vocab, _, layers = model_dims(model_config)
        return replace(base, d_ple=max(1, round(rom_params / (vocab * len(base.layer_indices(layers))))))

    def row_layout(self, model: nn.Module) -> tuple[int, int, list[int]]:
        state = ple_state(model)
        return model.get_input_embeddings().num_embeddings, state.cfg.d_ple, list(state.layers)

    def set_row_source(self, model: nn.Module, source) -> None:
        ple_state(model).row_source = source

    def export_rows(self, model: nn.Module) -> RowExport:
        state = ple_state(model)
        if state is None or state.external:
            raise RomscaleError("PLE rows are exported from a model with its table in memory")
        w = model.ple.table.weight.detach()
        per = w.view(w.shape[0], len(state.layers), state.cfg.d_ple)
        return RowExport(self.name, [per[:, s] for s in range(len(state.layers))], list(state.layers), self.address, state.cfg.to_dict())
