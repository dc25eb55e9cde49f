"""AdapterBank: loading, validation, accounting, write-back, bad input, atomic outputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import safetensors.torch
import torch
from adapters_helpers import lib4, lib_mixed, make_lora, tiny_llama, tok_ids, tree_hash  # noqa: F401 (fixtures)
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from romscale.adapters.bank import AdapterBank
from romscale.adapters.peft_io import LoraAdapter, LoraModule, read_peft_adapter, write_peft_adapter
from romscale.errors import AdapterError


def _peft_scalings(path) -> dict[str, float]:
    pm = PeftModel.from_pretrained(tiny_llama(0), str(path))
    return {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in pm.named_modules() if isinstance(getattr(m, "scaling", None), dict)}


def test_ranks_and_scalings_match_peft(lib_mixed):
    bank = AdapterBank.load(lib_mixed)
    assert bank.names == ["a", "b", "c"]
    assert len(bank.modules) == 8 and bank.modules[:2] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj"]
    for i, path in enumerate(lib_mixed):
        ref = _peft_scalings(path)
        assert set(ref) == set(bank.modules)
        for mod in bank.modules:
            assert bank.adapters[i].modules[mod].scaling == pytest.approx(ref[mod], rel=1e-12)
    b = bank.adapters[1].modules["model.layers.0.self_attn.q_proj"]
    assert b.use_rslora and b.scaling == pytest.approx(4 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    c = bank.adapters[2]
    assert c.modules["model.layers.1.self_attn.v_proj"].r == 2  # rank_pattern
    assert c.modules["model.layers.1.self_attn.o_proj"].scaling == pytest.approx(3 / 6)  # alpha_pattern


def test_storage_accounting_exact(lib_mixed, tmp_path):
    bank = AdapterBank.load(lib_mixed)
    st = bank.storage()
    expect = sum(t.numel() for a in bank.adapters for lm in a.modules.values() for t in (lm.A, lm.B))
    assert st.params == expect and st.bytes == 4 * expect
    assert st.total.by_dtype == {"float32": {"params": expect, "bytes": 4 * expect}}
    mod = "model.layers.0.self_attn.k_proj"  # 32 x 64 in the tiny model
    ranks = bank.ranks(mod)
    assert st.per_module[mod].params == sum(r * (64 + 32) for r in ranks)
    # A bf16 copy: bytes halve, params unchanged, dtype reported.
    write_peft_adapter(bank.adapters[0], tmp_path / "bf16", dtype=torch.bfloat16)
    bank2 = AdapterBank.load([tmp_path / "bf16", lib_mixed[1]])
    st0 = bank2.adapter_storage(0)
    assert st0.total.by_dtype == {"bfloat16": {"params": st0.params, "bytes": 2 * st0.params}}
    assert bank2.storage().total.by_dtype["float32"]["params"] == bank.adapter_storage(1).params


def test_write_back_loads_in_peft_and_is_identical(lib_mixed, tmp_path, tok_ids):
    bank = AdapterBank.load(lib_mixed)
    for i, name in enumerate(bank.names):
        out = bank.write_adapter(name, tmp_path / name)
        ref = PeftModel.from_pretrained(tiny_llama(0), str(lib_mixed[i]))
        new = PeftModel.from_pretrained(tiny_llama(0), str(out))
        with torch.no_grad():
            torch.testing.assert_close(new(input_ids=tok_ids).logits, ref(input_ids=tok_ids).logits, rtol=0, atol=0)


def test_legacy_bin_weights_only(lib4, tmp_path):
    src = lib4[0]
    dst = tmp_path / "legacy"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    state = safetensors.torch.load_file(str(src / "adapter_model.safetensors"))
    torch.save(state, dst / "adapter_model.bin")
    a, b = read_peft_adapter(src), read_peft_adapter(dst)
    for m in a.modules:
        assert torch.equal(a.modules[m].A, b.modules[m].A) and torch.equal(a.modules[m].B, b.modules[m].B)
    # A pickle with an arbitrary object is refused (weights_only), not executed.
    torch.save({"k": _Evil()}, dst / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.bin.*weights_only"):
        read_peft_adapter(dst)


class _Evil:
    def __reduce__(self):
        return (print, ("pickle executed",))


# ---- bad input ------------------------------------------------------------------------------------
def test_different_base_models(lib4, tmp_path):
    other = make_lora(tmp_path / "other", 9, base_name="someone/else")
    with pytest.raises(AdapterError, match="different base models.*someone/else"):
        AdapterBank.load([lib4[0], other])
    AdapterBank.load([lib4[0], other], allow_base_mismatch=True)  # explicit opt-in
    # Same name, different shapes: caught by shapes.
    wide = make_lora(tmp_path / "wide", 9, hidden=32)
    with pytest.raises(AdapterError, match=r"wide: module model.layers.0.self_attn.k_proj is 16x32 .*but 32x64"):
        AdapterBank.load([lib4[0], wide])


def test_mismatched_target_modules(lib4, tmp_path):
    qv = make_lora(tmp_path / "qv", 5, targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match=r"qv: adapted modules differ.*missing \['model.layers.0.self_attn.k_proj'"):
        AdapterBank.load([lib4[0], qv])


def test_non_lora_peft_type(tmp_path):
    pm = get_peft_model(tiny_llama(0), IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match=r"adapter_config.json: peft_type is 'IA3'; only LoRA"):
        read_peft_adapter(tmp_path / "ia3")


def test_dora_and_modules_to_save_refused(tmp_path):
    for kw, pat in ((dict(use_dora=True), "DoRA"), (dict(modules_to_save=["lm_head"]), "modules_to_save")):
        pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], **kw))
        pm.save_pretrained(str(tmp_path / pat))
        with pytest.raises(AdapterError, match=pat):
            read_peft_adapter(tmp_path / pat)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights(lib4, tmp_path, bad):
    dst = tmp_path / "bad"
    shutil.copytree(lib4[0], dst)
    state = safetensors.torch.load_file(str(dst / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][3, 1] = bad
    safetensors.torch.save_file(state, str(dst / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: model.layers.1.self_attn.v_proj.lora_B.weight has 1 NaN/Inf"):
        read_peft_adapter(dst)


def test_missing_and_corrupt_files(lib4, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_peft_adapter(tmp_path / "nope")
    d = tmp_path / "d"
    shutil.copytree(lib4[0], d)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_peft_adapter(d)
    shutil.copy(lib4[0] / "adapter_model.safetensors", d)
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        read_peft_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # garbage header
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        read_peft_adapter(d)
    shutil.copy(lib4[0] / "adapter_model.safetensors", d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: is not valid JSON"):
        read_peft_adapter(d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        read_peft_adapter(d)


def test_config_and_weights_disagree(lib4, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(lib4[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="rank 8 .* lora_A has 4 rows"):
        read_peft_adapter(d)
    state = safetensors.torch.load_file(str(lib4[0] / "adapter_model.safetensors"))
    del state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    safetensors.torch.save_file(state, str(d / "adapter_model.safetensors"))
    shutil.copy(lib4[0] / "adapter_config.json", d)
    with pytest.raises(AdapterError, match="q_proj has no lora_B"):
        read_peft_adapter(d)


# ---- outputs ----------------------------------------------------------------------------------------
def test_outputs_never_overwrite_inputs(lib4):
    bank = AdapterBank.load(lib4)
    before = {p: tree_hash(p) for p in lib4}
    with pytest.raises(AdapterError, match="inputs are never overwritten"):
        bank.write_adapter(bank.names[0], lib4[0], overwrite=True)
    with pytest.raises(AdapterError, match="inputs are never overwritten"):
        bank.write_adapter(bank.names[0], lib4[0].parent, overwrite=True)  # a folder containing inputs
    assert {p: tree_hash(p) for p in lib4} == before


def test_atomic_write_keeps_previous_output(lib4, tmp_path, monkeypatch):
    bank = AdapterBank.load(lib4)
    out = bank.write_adapter(bank.names[0], tmp_path / "out")
    good = tree_hash(out)
    with pytest.raises(AdapterError, match="already exists"):
        bank.write_adapter(bank.names[1], out)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.write_adapter(bank.names[1], out, overwrite=True)
    assert tree_hash(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind


def test_bank_rejects_duplicate_names_and_empty(lib4):
    a = read_peft_adapter(lib4[0])
    with pytest.raises(AdapterError, match="unique"):
        AdapterBank([a, a])
    with pytest.raises(AdapterError, match="at least one"):
        AdapterBank([])


def test_colliding_folder_names_made_unique(tmp_path):
    p1 = make_lora(tmp_path / "x" / "final", 1)
    p2 = make_lora(tmp_path / "y" / "final", 2)
    assert AdapterBank.load([p1, p2]).names == ["x__final", "y__final"]


def test_lora_module_delta_matches_peft(lib_mixed):
    a = read_peft_adapter(lib_mixed[1])
    pm = PeftModel.from_pretrained(tiny_llama(0), str(lib_mixed[1]))
    mod = pm.get_submodule("base_model.model.model.layers.0.self_attn.k_proj")
    lm: LoraModule = a.modules["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(lm.delta(), mod.get_delta_weight("default"))
    assert isinstance(a, LoraAdapter)


def test_output_inside_an_input_is_refused(lib4):
    bank = AdapterBank.load(lib4)
    with pytest.raises(AdapterError, match="lies inside the input"):
        bank.write_adapter(bank.names[0], lib4[1] / "copy")
    assert not (lib4[1] / "copy").exists()
