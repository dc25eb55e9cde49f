"""MeKi through the protocol: the same code as romscale.meki (fold preserves logits, rows by token id,
accounting agrees with romscale.meki.params)."""

import torch
from conftest import randomize_meki, tiny_base

from romscale.meki.attach import meki_branches
from romscale.meki.config import MekiConfig
from romscale.meki.params import parameter_report
from romscale.memories.base import get_memory, id_recorder


def test_fold_through_the_protocol_preserves_logits(family, ids):
    model = tiny_base(family)
    meki = get_memory("meki")
    cfg = MekiConfig(d_mem=8, position="after_attn")
    meki.attach(model, cfg)
    randomize_meki(model)
    assert id_recorder(model).keep == {"meki": 0}
    with torch.no_grad():
        before = model(ids).logits
        meki.fold(model)
        after = model(ids).logits
    assert meki.is_folded(model)
    assert (after - before).abs().max() < 1e-4
    rows = meki.export_rows(model)
    assert rows.address == "token" and rows.layers == [0, 1]
    assert all(t is b.table for t, (_, b) in zip(rows.tables, meki_branches(model), strict=True))
    report = parameter_report(model)
    assert meki.rom_params(cfg, model.config) == report["rom_params"]
    assert meki.ram_params(model) == report["meki_ram_params"]
