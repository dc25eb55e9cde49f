"""Memory bundles: PLE, Engram and fat-embedding rows exported to ROM tables keyed by memory type and
served by the bundle runtime (Engram's rows addressed by hashed n-gram ids)."""

import json

import pytest
import torch
from conftest import hf_tokenizer, memory_configs, memory_model, resign, tiny_base

from romscale.errors import CheckpointError, RomscaleError
from romscale.memories.base import get_memory
from romscale.rom.runtime import export_memory_bundle, load_memory_bundle, memory_table_files, verify_memory_bundle
from romscale.utils.outputs import output_kind

CONFIGS = memory_configs()
_model = memory_model


def _greedy(model, prompt, n):
    seq = prompt
    for _ in range(n):
        with torch.no_grad():
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return seq


@pytest.mark.parametrize("names", [("ple",), ("engram",), ("fat",), ("meki", "engram")])
def test_bundle_serves_the_rows(tmp_path, ids, names):
    model = _model(*names)
    path = export_memory_bundle(model, tmp_path / "b", dtype="fp16")
    assert output_kind(path) == "memory-bundle"
    for name in names:
        _, manifest_file = memory_table_files(name)
        m = json.loads((path / manifest_file).read_text())
        assert m["memory"] == name and m["address"] == get_memory(name).address and m[name] == CONFIGS[name].to_dict()
    b = load_memory_bundle(path)
    assert set(b.tables) == set(names)
    with torch.no_grad():
        assert (b.model(ids).logits - model(ids).logits).abs().max() < 2e-2  # fp16 rows
    prompt = ids[:, :4]
    cached = b.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cached, _greedy(b.model, prompt, 5))
    summary = verify_memory_bundle(path)
    assert set(summary["memories"]) == set(names)
    b.close()


def test_engram_reads_hashed_rows_on_demand(tmp_path):
    b = load_memory_bundle(export_memory_bundle(_model("engram"), tmp_path / "b"), prefetch=True)
    calls = []
    table = b.tables["engram"]
    get_memory("engram").set_row_source(b.model, lambda rid: calls.append(rid.clone()) or table.rows(rid))
    prompt = torch.tensor([[4, 5, 6]])
    b.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    # One fetch per forward: the prompt's n-gram rows, then one position's per decode step.
    assert [c.shape for c in calls] == [(1, 3, 4), (1, 1, 4), (1, 1, 4)]
    assert int(torch.cat([c.flatten() for c in calls]).max()) < CONFIGS["engram"].total_rows
    assert table.manifest["vocab_size"] == CONFIGS["engram"].total_rows
    b.close()


def test_bad_memory_bundles(tmp_path):
    path = export_memory_bundle(_model("ple"), tmp_path / "b")
    _, manifest_file = memory_table_files("ple")
    m = json.loads((path / manifest_file).read_text())
    m["ple"]["d_ple"] = 4
    (path / manifest_file).write_text(json.dumps(m))
    resign(path)
    with pytest.raises(CheckpointError, match="ple config"):
        load_memory_bundle(path)
    path2 = export_memory_bundle(_model("engram"), tmp_path / "b2")
    table_file, _ = memory_table_files("engram")
    data = bytearray((path2 / table_file).read_bytes())
    data[-40] ^= 0xFF
    (path2 / table_file).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|checksum"):
        verify_memory_bundle(path2)
    unfolded = tiny_base("llama")
    get_memory("meki").attach(unfolded, CONFIGS["meki"])
    get_memory("ple").attach(unfolded, CONFIGS["ple"])
    with pytest.raises(RomscaleError, match="fold"):
        export_memory_bundle(unfolded, tmp_path / "b3")
    assert not (tmp_path / "b3").exists()


def test_cli_exports_and_verifies_a_memory_checkpoint(tmp_path, cli):
    from romscale.meki.io import save_memories

    save_memories(_model("engram", "ple"), tmp_path / "ck")
    r = cli("bundle", "export", tmp_path / "ck", "--out", tmp_path / "b", "--dtype", "int8")
    assert r.exit_code == 0, r
    assert output_kind(tmp_path / "b") == "memory-bundle"
    r = cli("bundle", "verify", tmp_path / "b", "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r
    assert set(json.loads((tmp_path / "v.json").read_text())["memories"]) == {"engram", "ple"}
    assert "ngram-hash" in r.stdout


def test_cli_generates_from_a_memory_bundle(tmp_path, cli):
    from romscale.meki.io import save_memories

    save_memories(_model("engram"), tmp_path / "ck", tokenizer=hf_tokenizer())
    assert cli("bundle", "export", tmp_path / "ck", "--out", tmp_path / "b").exit_code == 0
    r = cli("bundle", "generate", tmp_path / "b", "--prompt", "the cat", "--max-new-tokens", "4", "--no-prefetch")
    assert r.exit_code == 0, r
    assert r.stdout.startswith("the cat")
