"""Every memory behind the one protocol: attach to every tiny HF family, retrofit identity, the
output moves once the tables are non-zero, training reaches every parameter, KV-cached generation
equals the no-cache forward, left padding equals no padding, save/load round trips, detach."""

import pytest
import torch
from conftest import tiny_base

from romscale.errors import RomscaleError
from romscale.meki.config import MekiConfig
from romscale.meki.io import MEMORY_CHECKPOINT_KIND, load_memories, save_memories
from romscale.memories.base import attached_memories, get_memory, id_recorder, memory_names, memory_state_dicts
from romscale.memories.engram import EngramConfig
from romscale.memories.fat import FatConfig
from romscale.memories.ple import PleConfig
from romscale.utils.outputs import output_kind

CONFIGS = {
    "meki": MekiConfig(d_mem=8),
    "ple": PleConfig(d_ple=8),
    "engram": EngramConfig(layers=(0, 1), rows_per_head=13, heads=2, d_head=4),
    "fat": FatConfig(extra=8),
}
NAMES = sorted(CONFIGS)


def randomize(model, name: str, std: float = 0.5, seed: int = 1) -> None:
    """Non-trivial values in every parameter of memory `name` (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if name in n.split("."):
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() <= 1 else 0.0))


def attached(name: str, family: str = "llama", seed: int = 1):
    model = tiny_base(family)
    get_memory(name).attach(model, CONFIGS[name])
    randomize(model, name, seed=seed)
    return model


def greedy_no_cache(model, prompt: torch.Tensor, n: int, eos: int = 1, pad: int = 0) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache), finished rows padded as generate() does."""
    seq, done = prompt, torch.zeros(len(prompt), dtype=torch.bool)
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done |= nxt == eos
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


def test_registry_lists_every_memory():
    assert memory_names() == ["engram", "fat", "meki", "ple"]
    with pytest.raises(RomscaleError, match="engram, fat, meki, ple"):
        get_memory("lora")


@pytest.mark.parametrize("name", NAMES)
def test_retrofit_identity_then_output_moves(name, family, ids):
    model = tiny_base(family)
    with torch.no_grad():
        ref = model(ids).logits
    mem = get_memory(name)
    mem.attach(model, CONFIGS[name])
    assert [m.name for m in attached_memories(model)] == [name]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # zero-initialised output: exactly the base model
    randomize(model, name)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-2
    with pytest.raises(RomscaleError, match="already"):
        mem.attach(model, CONFIGS[name])
    mem.detach(model)
    assert id_recorder(model) is None and not attached_memories(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("name", NAMES)
def test_training_moves_every_memory_parameter(name, ids):
    model = tiny_base("qwen3")
    mem = get_memory(name)
    mem.attach(model, CONFIGS[name])
    params = {n: p for n, p in model.named_parameters() if name in n.split(".")}
    assert set(params) == set(mem.state_dict(model))  # the section is exactly the memory's parameters
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not [n for n, p in params.items() if torch.equal(p, before[n])]


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_kv_cache_equals_full_forward(name, family):
    model = attached(name, family)
    prompt = torch.tensor([[5, 17, 33, 8, 41], [9, 9, 9, 3, 4]])
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_no_cache(model, prompt, 8))


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_matches_no_padding(name):
    model = attached(name, "qwen3")
    a = torch.tensor([9, 10, 11, 12, 13, 14])
    b = torch.tensor([20, 21, 22])
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])  # pad id 0, left side
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, seq in enumerate((a, b)):
        single = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = single[0, len(seq) :]  # stops at EOS; the batch goes on, padding finished rows
        assert torch.equal(out[row, 6 : 6 + len(new)], new) and not out[row, 6 + len(new) :].any()
    # The padded row's logits at its real positions equal the unpadded row's (same ids seen).
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits[1, 3:]
        alone = model(input_ids=b[None]).logits[0]
    assert (padded - alone).abs().max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, name, tie, ids):
    model = tiny_base("mistral", tie=tie)
    get_memory(name).attach(model, CONFIGS[name])
    randomize(model, name)
    save_memories(model, tmp_path / "ck")
    assert output_kind(tmp_path / "ck") == ("meki-checkpoint" if name == "meki" else MEMORY_CHECKPOINT_KIND)
    loaded = load_memories(tmp_path / "ck")
    mem = get_memory(name)
    assert [m.name for m in attached_memories(loaded)] == [name]
    assert mem.config_of(loaded) == CONFIGS[name]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    sd, sd2 = mem.state_dict(model), mem.state_dict(loaded)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_two_memories_share_one_recorder(tmp_path, ids):
    model = tiny_base("llama")
    get_memory("engram").attach(model, CONFIGS["engram"])
    get_memory("ple").attach(model, CONFIGS["ple"])
    randomize(model, "engram"), randomize(model, "ple", seed=2)
    rec = id_recorder(model)
    assert rec.keep == {"engram": 2, "ple": 0}
    sections = memory_state_dicts(model)
    assert sorted(sections) == ["engram", "ple"]
    assert all("ple" not in k.split(".") for k in sections["engram"])
    prompt = ids[:, :5]
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_no_cache(model, prompt, 6))
    save_memories(model, tmp_path / "ck")
    loaded = load_memories(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    get_memory("engram").detach(model)
    assert id_recorder(model).keep == {"ple": 0}


@pytest.mark.parametrize("name", NAMES)
def test_rom_params_match_the_exported_rows(name):
    model = attached(name)
    mem = get_memory(name)
    if mem.foldable:
        mem.fold(model)
    else:
        with pytest.raises(RomscaleError, match="no fold"):
            mem.fold(model)
    rows = mem.export_rows(model)
    assert rows.memory == name and rows.address == mem.address
    assert sum(t.numel() for t in rows.tables) == mem.rom_params(CONFIGS[name], model.config)
    assert mem.ram_params(model) > 0


def test_inputs_embeds_is_a_clear_error(ids):
    model = attached("engram")
    with pytest.raises(RomscaleError, match="input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids))
