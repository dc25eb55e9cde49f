"""Fat embedding: E[x] + W_up X[x] on the input side only, honest ROM accounting, width limit."""

import pytest
import torch
from conftest import tiny_base

from romscale.errors import RomscaleError
from romscale.memories.base import get_memory
from romscale.memories.budget import size_for_budget
from romscale.memories.fat import FatConfig


def test_only_the_input_embedding_widens(ids):
    model = tiny_base("llama", tie=True)
    get_memory("fat").attach(model, FatConfig(extra=8))
    with torch.no_grad():
        model.fat.up.weight.normal_()
        emb = model.get_input_embeddings()(ids)
        want = model.get_input_embeddings().weight[ids] + model.fat.table.weight[ids] @ model.fat.up.weight.T
    assert torch.allclose(emb, want, atol=1e-6)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tied head is untouched


def test_accounting_and_width_limit():
    model = tiny_base("llama")
    fat = get_memory("fat")
    assert fat.rom_params(FatConfig(extra=8), model.config) == 96 * 8
    fat.attach(model, FatConfig(extra=8))
    assert fat.ram_params(model) == 8 * 32  # W_up only; the table is ROM
    with pytest.raises(RomscaleError, match="model width"):
        fat.attach(tiny_base("llama"), FatConfig(extra=33))
    with pytest.raises(RomscaleError, match="at most"):
        size_for_budget("fat", 96 * 40, model.config)
    with pytest.raises(RomscaleError, match="layers"):
        FatConfig(layers=(0,))
