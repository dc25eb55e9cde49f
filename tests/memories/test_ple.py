"""PLE specifics: Gemma 3n's equations by hand, rows addressed by token id, no fold, selected layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_base

from romscale.errors import RomscaleError
from romscale.memories.base import get_memory
from romscale.memories.ple import PleConfig, ple_state


def _model():
    model = tiny_base("llama")
    get_memory("ple").attach(model, PleConfig(d_ple=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ple" in n.split("."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() <= 1 else 0.0))
    return model


def test_per_layer_inputs_follow_gemma3n(ids):
    model = _model()
    with torch.no_grad():
        model(input_ids=ids)
        got = ple_state(model).per_layer
        e = model.get_input_embeddings().weight[ids]
        z = model.ple.proj_norm((e @ model.ple.proj.weight.T * 32**-0.5).view(*ids.shape, 2, 8))
        t = model.ple.table.weight[ids].view(*ids.shape, 2, 8)
        want = (z + math.sqrt(8) * t) / math.sqrt(2)
    assert got.shape == (*ids.shape, 2, 8)
    assert torch.allclose(got, want, atol=1e-6)


def test_layer_branch_is_a_gelu_gate_after_the_block(ids):
    model = _model()
    layer = model.model.layers[1]
    seen = {}
    hook = layer.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))  # runs after PLE's hook
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    # The plain block output (layer 1's PLE hook off), then the branch added by hand.
    b = layer.ple
    p = ple_state(model).per_layer[..., 1, :]
    ple_state(model).handles[1].remove()
    plain = {}
    h = layer.register_forward_hook(lambda m, a, out: plain.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=ids)
        h.remove()
        want = plain["out"] + b.post_norm(b.up(F.gelu(b.gate(plain["out"]), approximate="tanh") * p))
    assert torch.allclose(seen["out"], want, atol=1e-5)


def test_rows_are_the_table_by_token_id():
    model = _model()
    rows = get_memory("ple").export_rows(model)
    assert rows.address == "token" and rows.layers == [0, 1]
    w = model.ple.table.weight.view(96, 2, 8)
    assert all(torch.equal(t, w[:, s]) for s, t in enumerate(rows.tables))
    assert get_memory("ple").rom_param_names(model) == ["ple.table.weight"]


def test_selected_layers_and_bad_config():
    model = tiny_base("qwen3")
    get_memory("ple").attach(model, PleConfig(d_ple=4, layers=(1,)))
    assert not hasattr(model.model.layers[0], "ple") and hasattr(model.model.layers[1], "ple")
    assert model.ple.table.weight.shape == (96, 4)
    assert get_memory("ple").rom_params(PleConfig(d_ple=4, layers=(1,)), model.config) == 96 * 4
    with pytest.raises(RomscaleError, match="d_ple"):
        PleConfig(d_ple=0)
    with pytest.raises(RomscaleError, match="unknown PleConfig keys"):
        PleConfig.from_dict({"d_ple": 4, "colour": 1})
