"""Fat embedding: the control arm that spends the same ROM on a wider input embedding
(meki.md "Related memories").

The input embedding becomes [E[x]; X[x]] of width d + extra, projected back to d by [I | W_up]:
    emb(x) = E[x] + W_up X[x]          X: [|V|, extra] in ROM, W_up: d x extra in RAM
The identity block keeps the base embedding as it is (a retrofit keeps its logits with
`zero_init_output`: W_up starts at 0); a free (d + extra) x d projection would add d^2 RAM
parameters the other arms do not get. The output head is untouched (tied or not).

ROM accounting is honest: rom_params = |V| x extra, and extra <= d is required, because beyond that
W_up X[x] could be precomputed into a |V| x d table: more stored parameters would buy nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from romscale.errors import RomscaleError
from romscale.memories.base import (
    IdRecorder,
    Memory,
    MemoryConfig,
    RowExport,
    family_of,
    join_recorder,
    leave_recorder,
    model_dims,
    register_memory,
)


@dataclass(frozen=True)
class FatConfig(MemoryConfig):
    """extra: added embedding width (<= the model width d)."""

    extra: int = 32
    zero_init_output: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("extra")
        if self.layers is not None:
            raise RomscaleError("FatConfig.layers must be None: the fat embedding widens the input embedding, not layers")


class FatEmbedding(nn.Module):
    def __init__(self, cfg: FatConfig, d_model: int, vocab_size: int, external: bool) -> None:
        super().__init__()
        self.table = None if external else nn.Embedding(vocab_size, cfg.extra)
        self.up = nn.Linear(cfg.extra, d_model, bias=False)

    def forward(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            if self.table is None:
                raise RomscaleError("this fat-embedding model reads its table from storage, but no ROM table is connected")
            rows = self.table(ids)
        return self.up(rows.reshape(*ids.shape, -1).to(self.up.weight.dtype))


@dataclass
class FatState:
    cfg: FatConfig
    external: bool
    ids: torch.Tensor | None = None
    rows: Any = None
    row_source: Callable[[torch.Tensor], Any] | None = None  # ids -> ids.shape + (1, extra)
    handles: list = field(default_factory=list)  # hook handles, removed by detach


STATE_ATTR = "_fat_state"


def fat_state(model: nn.Module) -> FatState | None:
    return getattr(model, STATE_ATTR, None)


@register_memory
class FatMemory(Memory):
    name = "fat"
    config_cls = FatConfig
    foldable = False
    label, state_attr = "the fat embedding", STATE_ATTR
    address = "token"

    def attach(self, model: nn.Module, cfg: FatConfig, *, folded: bool = False, external: bool = False) -> nn.Module:
        self.check_attach(model, cfg)
        family_of(model, "the fat embedding")
        embedding = model.get_input_embeddings()
        vocab, d = embedding.weight.shape
        if cfg.extra > d:
            raise RomscaleError(f"FatConfig.extra={cfg.extra} exceeds the model width {d}: beyond it the table folds to |V| x d")
        ref = embedding.weight
        with torch.device(ref.device):
            model.fat = FatEmbedding(cfg, d, vocab, external).to(ref.dtype)
        if not ref.is_meta:
            with torch.no_grad():
                if model.fat.table is not None:
                    nn.init.normal_(model.fat.table.weight, std=cfg.init_std)
                nn.init.normal_(model.fat.up.weight, std=cfg.init_std)
                if cfg.zero_init_output:
                    model.fat.up.weight.zero_()
        state = FatState(cfg=cfg, external=external)
        object.__setattr__(model, STATE_ATTR, state)

        def on_ids(rec: IdRecorder) -> None:
            state.ids = rec.ids
            state.rows = state.row_source(rec.ids) if state.row_source is not None else None

        join_recorder(model, self.name, keep=0, listener=on_ids)

        def hook(_m, args, out):
            # The embedding's own input: the recorded ids when called by the model, whatever ids
            # when someone calls the embedding module directly.
            ids = args[0]
            rows = state.rows if ids is state.ids else (state.row_source(ids) if state.row_source is not None else None)
            if rows is not None and not isinstance(rows, torch.Tensor):  # a prefetcher's Future
                rows = rows.result()
            return out + model.fat(ids, rows).to(out.dtype)

        state.handles.append(embedding.register_forward_hook(hook))
        model.config.fat = {**cfg.to_dict(), "folded": False, "tables": "external" if external else "inline"}
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        state = fat_state(model)
        if state is None:
            raise RomscaleError("this model has no fat embedding attached")
        for h in state.handles:
            h.remove()
        leave_recorder(model, self.name)
        del model.fat
        object.__delattr__(model, STATE_ATTR)
        delattr(model.config, self.name)
        return model

    def is_attached(self, model: nn.Module) -> bool:
        return fat_state(model) is not None

    def rom_params(self, cfg: FatConfig, model_config: Any) -> int:
        vocab, d, _ = model_dims(model_config)
        if cfg.extra > d:
            raise RomscaleError(f"FatConfig.extra={cfg.extra} exceeds the model width {d}: beyond it the table folds to |V| x d")
        return vocab * cfg.extra

    def rom_param_names(self, model: nn.Module) -> list[str]:
        state = fat_state(model)
        return ["fat.table.weight"] if state is not None and not state.external else []

    def size_for_budget(self, rom_params: int, model_config: Any, base: FatConfig | None = None) -> FatConfig:
        base = base or FatConfig()
        vocab, d, _ = model_dims(model_config)
        extra = max(1, round(rom_params / vocab))
        if extra > d:
            raise RomscaleError(
                f"a ROM budget of {rom_params:,} parameters needs a fat embedding {extra} wide, more than the model width {d}: "
                f"the fat embedding can hold at most |V| x d = {vocab * d:,} (beyond that it folds to |V| x d)"
            )
        return replace(base, extra=extra)

    def row_layout(self, model: nn.Module) -> tuple[int, int, list[int]]:
        return model.get_input_embeddings().num_embeddings, fat_state(model).cfg.extra, [-1]

    def set_row_source(self, model: nn.Module, source) -> None:
        fat_state(model).row_source = source

    def export_rows(self, model: nn.Module) -> RowExport:
        state = fat_state(model)
        if state is None or state.external:
            raise RomscaleError("fat-embedding rows are exported from a model with its table in memory")
        return RowExport(self.name, [model.fat.table.weight.detach()], [-1], self.address, state.cfg.to_dict())
