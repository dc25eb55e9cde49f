"""RAM / ROM parameter accounting. Works on meta-device models (nothing allocated)."""

from __future__ import annotations

from typing import Any

from torch import nn

from romscale.meki.attach import meki_branches, meki_state


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Counts for the deployed form of `model` (folded or not yet folded).

    ram_params: what stays in RAM after folding (base model + gate/output projections and norms).
    rom_params: the folded tables, L x |V| x d_mem, read from flash per token.
    fold_away_params: training-only parameters that the fold removes (static tables, G, scalars).
    Tied parameters are counted once.
    """
    branches = meki_branches(model)
    state = meki_state(model)
    meki_ram = fold_away = 0
    for _, b in branches:
        for name, p in b.named_parameters():
            if name == "table":
                continue
            if name.startswith("memory."):
                fold_away += p.numel()
            else:
                meki_ram += p.numel()
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    table_params = sum(b.table.numel() for _, b in branches if b.table is not None)
    dense = total - meki_ram - fold_away - table_params
    rom = sum(b.vocab_size * b.cfg.d_mem for _, b in branches)
    return {
        "dense_params": dense,
        "meki_ram_params": meki_ram,
        "ram_params": dense + meki_ram,
        "rom_params": rom,
        "fold_away_params": fold_away,
        "total_params": total,  # the model as it is now (training or folded form)
        "meki_layers": len(branches),
        "folded": bool(state and state.folded),
        "rom_bytes_fp16": 2 * rom,
        "ram_bytes_bf16": 2 * (dense + meki_ram),
    }
