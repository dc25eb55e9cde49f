"""Folding: exact (to float rounding) for every variant, idempotent, and clear when misused."""

import itertools

import pytest
import torch

from conftest import randomize_meki, tiny_base
from romscale.errors import RomscaleError
from romscale.meki.attach import attach_meki, meki_branches
from romscale.meki.config import FUSIONS, MEMORIES, POSITIONS, MekiConfig
from romscale.meki.fold import fold
from romscale.meki.params import parameter_report

VARIANTS = list(itertools.product(MEMORIES, POSITIONS, FUSIONS))


@pytest.mark.parametrize("memory, position, fusion", VARIANTS)
def test_fold_preserves_logits_and_greedy_tokens(memory, position, fusion, ids):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8, memory=memory, position=position, fusion=fusion))
    randomize_meki(model)
    prompt = ids[:1, :5]
    with torch.no_grad():
        before = model(ids).logits
    gen_before = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    fold(model)
    with torch.no_grad():
        after = model(ids).logits
    gen_after = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert (after - before).abs().max().item() <= 1e-5
    assert torch.equal(gen_before, gen_after)


def test_fold_works_for_every_family(family, ids):
    model = tiny_base(family)
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    with torch.no_grad():
        before = model(ids).logits
    fold(model)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max().item() <= 1e-5


def test_folded_form_has_only_tables(ids):
    model = tiny_base("qwen2")
    attach_meki(model, MekiConfig(d_mem=8, dynamic_proj="linear"))
    randomize_meki(model)
    fold(model)
    names = [n for n, _ in model.named_parameters() if ".meki." in n]
    assert not [n for n in names if ".memory." in n]  # no G, static M, alpha, beta or mix norm
    for _, branch in meki_branches(model):
        assert branch.table.shape == (model.get_input_embeddings().num_embeddings, 8)
    report = parameter_report(model)
    assert report["folded"] and report["fold_away_params"] == 0
    assert report["rom_params"] == 2 * 96 * 8


def test_fold_twice_is_a_no_op(ids):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    fold(model)
    tables = [b.table.detach().clone() for _, b in meki_branches(model)]
    fold(model)
    assert all(torch.equal(t, b.table) for t, (_, b) in zip(tables, meki_branches(model)))


def test_fold_without_meki_is_an_error():
    with pytest.raises(RomscaleError, match="no MeKi"):
        fold(tiny_base("llama"))
