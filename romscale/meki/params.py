"""RAM / ROM parameter accounting. Works on meta-device models (nothing allocated)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from romscale.meki.attach import meki_branches, meki_state
from romscale.meki.config import MekiConfig
from romscale.meki.layer import MekiBranch

if TYPE_CHECKING:
    from romscale.meki.presets import Preset


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
    return _report(dense, meki_ram, rom, fold_away, total, len(branches), bool(state and state.folded))


def _report(dense: int, meki_ram: int, rom: int, fold_away: int, total: int, layers: int, folded: bool) -> dict[str, Any]:
    return {
        "dense_params": dense,
        "meki_ram_params": meki_ram,
        "ram_params": dense + meki_ram,
        "rom_params": rom,
        "fold_away_params": fold_away,
        "total_params": total,  # the model as it is now (training or folded form)
        "meki_layers": layers,
        "folded": folded,
        "rom_bytes_fp16": 2 * rom,
        "ram_bytes_bf16": 2 * (dense + meki_ram),
    }


def _base_params(p: "Preset") -> int:
    """Parameters of the Llama / Qwen3 decoder a preset describes (no biases; Qwen3 adds per-head
    q/k RMSNorms). tests/meki check it against the model transformers builds for every preset."""
    q, kv = p.heads * p.head_dim, p.kv_heads * p.head_dim
    attn = p.hidden * q + 2 * p.hidden * kv + q * p.hidden + (2 * p.head_dim if p.family == "qwen3" else 0)
    layer = attn + 3 * p.hidden * p.ffn + 2 * p.hidden
    embed = p.vocab * p.hidden
    return embed + p.layers * layer + p.hidden + (0 if p.tie_embeddings else embed)


@contextlib.contextmanager
def _shapes_only() -> Iterator[None]:
    """Parameter initialisers do nothing inside: counting needs shapes only, and filling meta
    tensors goes through torch._refs, which imports torch._dynamo (1.2 s of `meki info`'s 4 s here)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def preset_report(p: "Preset", cfg: MekiConfig) -> dict[str, Any]:
    """parameter_report of a preset's model in the training form, without building the model: the
    base decoder is counted from its shape, MeKi from a real MekiBranch on the meta device (so the
    branch's parameters have one definition). `romscale meki info` uses it to start in ~1 s instead
    of importing transformers' modeling code (~3 s here)."""
    with torch.device("meta"), _shapes_only():
        branch = MekiBranch(cfg, p.hidden, p.vocab)
    fold_away = sum(t.numel() for n, t in branch.named_parameters() if n.startswith("memory."))
    meki_ram = sum(t.numel() for n, t in branch.named_parameters() if not n.startswith("memory.") and n != "table")
    layers = len(cfg.layer_indices(p.layers))
    dense = _base_params(p)
    total = dense + layers * (meki_ram + fold_away)
    return _report(dense, layers * meki_ram, layers * p.vocab * cfg.d_mem, layers * fold_away, total, layers, False)
