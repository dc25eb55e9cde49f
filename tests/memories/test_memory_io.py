"""Checkpoints keyed by memory type: sections in config.json, the manifest's record, clear errors."""

import json

import pytest
import torch
from conftest import randomize_meki, resign, tiny_base

from romscale.errors import CheckpointError
from romscale.meki.attach import attach_meki
from romscale.meki.config import MekiConfig
from romscale.meki.io import MANIFEST_FILE, load_meki, load_memories, save_meki, save_memories
from romscale.memories.base import attached_memories, get_memory
from romscale.memories.engram import EngramConfig
from romscale.memories.ple import PleConfig


def _saved(tmp_path):
    model = tiny_base("llama")
    get_memory("ple").attach(model, PleConfig(d_ple=4))
    get_memory("engram").attach(model, EngramConfig(rows_per_head=7, heads=1, d_head=2))
    save_memories(model, tmp_path / "ck")
    return tmp_path / "ck"


def test_sections_are_keyed_by_memory_type(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["ple"]["d_ple"] == 4 and cfg["engram"]["rows_per_head"] == 7
    assert cfg["ple"]["tables"] == "inline" and cfg["engram"]["folded"] is False
    m = json.loads((path / MANIFEST_FILE).read_text())
    assert m["kind"] == "memory-checkpoint" and m["memories"] == {"engram": {"folded": False}, "ple": {"folded": False}}
    with pytest.raises(CheckpointError, match="meki-checkpoint"):
        load_meki(path)  # not a MeKi checkpoint


def test_a_meki_checkpoint_loads_through_the_generic_loader(tmp_path, ids):
    model = tiny_base("qwen3")
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    save_meki(model, tmp_path / "ck")
    loaded = load_memories(tmp_path / "ck")
    assert [m.name for m in attached_memories(loaded)] == ["meki"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["ple"].update(d_ple=8), "shape"),
        (lambda c: c["engram"].update(colour=1), "unknown EngramConfig keys"),
        (lambda c: c["ple"].update(folded="no"), "'ple.folded' must be true or false"),
        (lambda c: c.pop("engram"), "memories"),
        (lambda c: [c.pop("engram"), c.pop("ple")], "no memory section"),
    ],
)
def test_edited_sections_are_refused(tmp_path, edit, match):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    resign(path)
    with pytest.raises(CheckpointError, match=match):
        load_memories(path)


def test_nothing_attached_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no memory attached"):
        save_memories(tiny_base("llama"), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
