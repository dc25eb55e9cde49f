"""MeKi behind the memory protocol: a thin adapter over romscale.meki (attach, fold, accounting),
which stays the one implementation of MeKi's layer, hooks and fold."""

from __future__ import annotations

from typing import Any

from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.attach import attach_meki, detach_meki, meki_branches, meki_state
from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold as fold_meki
from romscale.memories.base import Memory, RowExport, model_dims, register_memory


@register_memory
class MekiMemory(Memory):
    """Token-id-indexed table per layer + a dynamic projection of the word embedding that folds
    into the table (meki.md). ROM: L x |V| x d_mem (the folded tables)."""

    name = "meki"
    config_cls = MekiConfig
    foldable = True
    address = "token"
    label, state_attr = "MeKi", "_meki_state"  # romscale.meki.attach keeps its state there

    def attach(self, model: nn.Module, cfg: MekiConfig, *, folded: bool = False, external: bool = False) -> nn.Module:
        if not isinstance(cfg, MekiConfig):
            raise RomscaleError(f"MeKi needs a MekiConfig, got {type(cfg).__name__}")
        return attach_meki(model, cfg, folded=folded, external=external)

    def detach(self, model: nn.Module) -> nn.Module:
        return detach_meki(model)

    def is_attached(self, model: nn.Module) -> bool:
        return meki_state(model) is not None

    def is_folded(self, model: nn.Module) -> bool:
        state = meki_state(model)
        return bool(state and state.folded)

    def rom_params(self, cfg: MekiConfig, model_config: Any) -> int:
        vocab, _, layers = model_dims(model_config)
        return vocab * cfg.d_mem * len(cfg.layer_indices(layers))

    def rom_param_names(self, model: nn.Module) -> list[str]:
        # Before the fold the ROM does not exist yet: what will become it (M, G, alpha, beta) is
        # training-only and counted by romscale.meki.params as fold_away_params, not RAM.
        return [k for k in model.state_dict() if k.endswith(".meki.table") or ".meki.memory." in k]

    def size_for_budget(self, rom_params: int, model_config: Any, base: MekiConfig | None = None) -> MekiConfig:
        from dataclasses import replace

        base = base or MekiConfig()
        vocab, _, layers = model_dims(model_config)
        per_unit = vocab * len(base.layer_indices(layers))  # ROM per unit of d_mem
        return replace(base, d_mem=max(1, round(rom_params / per_unit)))

    def fold(self, model: nn.Module) -> nn.Module:
        return fold_meki(model)

    def row_layout(self, model: nn.Module) -> tuple[int, int, list[int]]:
        state = meki_state(model)
        return model.get_input_embeddings().num_embeddings, state.cfg.d_mem, [i for i, _ in meki_branches(model)]

    def set_row_source(self, model: nn.Module, source) -> None:
        meki_state(model).row_source = source

    def export_rows(self, model: nn.Module) -> RowExport:
        state = meki_state(model)
        if state is None or not state.folded or state.external:
            raise RomscaleError("MeKi rows are exported from a folded model with its tables in memory: call fold(model) first")
        branches = meki_branches(model)
        return RowExport("meki", [b.table for _, b in branches], [i for i, _ in branches], self.address, state.cfg.to_dict())
