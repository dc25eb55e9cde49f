"""A ROM budget gives matched arms: every memory's ROM within a few percent of N."""

import pytest
from conftest import tiny_base

from romscale.errors import RomscaleError
from romscale.meki.presets import get_preset
from romscale.memories.base import get_memory
from romscale.memories.budget import matched_arms, size_for_budget

NAMES = ["meki", "ple", "engram", "fat"]


@pytest.mark.parametrize("budget", [96 * 2 * 16, 96 * 2 * 13 + 5])
def test_tiny_model_arms_are_matched(budget):
    from romscale.memories.engram import EngramConfig

    cfg = tiny_base("llama").config
    # A table of ~3k parameters: narrow Engram rows, so the prime moduli can get close to the budget.
    arms = matched_arms(NAMES, budget, cfg, bases={"engram": EngramConfig(heads=2, d_head=2)})
    for name, arm in arms.items():
        assert abs(arm["rel_error"]) <= 0.05, (name, arm)
        assert get_memory(name).rom_params(arm["config"], cfg) == arm["rom_params"]


def test_demo_preset_arms_are_matched():
    p = get_preset("demo")
    cfg = p.base_config()
    budget = get_memory("meki").rom_params(size_for_budget("meki", p.vocab * p.layers * p.d_mem, cfg), cfg)
    arms = matched_arms(NAMES, budget, cfg)
    assert arms["meki"]["config"].d_mem == p.d_mem
    assert all(abs(a["rel_error"]) <= 0.02 for a in arms.values()), arms


def test_sizing_keeps_the_other_fields():
    from romscale.memories.engram import EngramConfig

    cfg = tiny_base("llama").config
    base = EngramConfig(layers=(0,), heads=3, d_head=2)
    got = size_for_budget("engram", 5000, cfg, base)
    assert (got.layers, got.heads, got.d_head) == ((0,), 3, 2)
    with pytest.raises(RomscaleError, match="positive"):
        size_for_budget("ple", 0, cfg)
