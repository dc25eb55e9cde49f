"""AdapterBank: loading, validation, accounting, write-back, bad and hostile input, safe outputs."""

from __future__ import annotations

import json
import math
import shutil

import os
import struct

import pytest
import safetensors.torch
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from romscale.adapters.bank import AdapterBank
from romscale.adapters.order import default_order, model_order
from romscale.adapters.peft_io import LoraAdapter, LoraModule, read_peft_adapter, write_peft_adapter
from romscale.errors import AdapterError
from romscale.utils.outputs import MANIFEST, OutputError, output_kind


def _peft_scalings(tiny_llama, path) -> dict[str, float]:
    pm = PeftModel.from_pretrained(tiny_llama(0), str(path))
    return {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in pm.named_modules() if isinstance(getattr(m, "scaling", None), dict)}


def test_ranks_and_scalings_match_peft(lib_mixed, tiny_llama):
    bank = AdapterBank.load(lib_mixed)
    assert bank.names == ["a", "b", "c"]
    # The model's module order (q, k, v, o), not sorted names (k, o, q, v).
    assert len(bank.modules) == 8 and bank.modules[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert bank.modules == model_order(tiny_llama(0), bank.modules)
    for i, path in enumerate(lib_mixed):
        ref = _peft_scalings(tiny_llama, path)
        assert set(ref) == set(bank.modules)
        for mod in bank.modules:
            assert bank.adapters[i].modules[mod].scaling == pytest.approx(ref[mod], rel=1e-12)
    b = bank.adapters[1].modules["model.layers.0.self_attn.q_proj"]
    assert b.use_rslora and b.scaling == pytest.approx(4 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    c = bank.adapters[2]
    assert c.modules["model.layers.1.self_attn.v_proj"].r == 2  # rank_pattern
    assert c.modules["model.layers.1.self_attn.o_proj"].scaling == pytest.approx(3 / 6)  # alpha_pattern


def test_default_order_is_the_model_order(family):
    """Without the model, the declaration order still gives named_modules() order (every family)."""
    from conftest import tiny_base

    linear = [n for n, m in tiny_base(family).named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) > 8 and default_order(sorted(linear)) == linear


def test_storage_accounting_exact(lib_mixed, tmp_path):
    bank = AdapterBank.load(lib_mixed)
    st = bank.storage()
    expect = sum(t.numel() for a in bank.adapters for lm in a.modules.values() for t in (lm.A, lm.B))
    assert st.params == expect and st.bytes == 4 * expect and bank.dtype == torch.float32
    assert st.total.by_dtype == {"float32": {"params": expect, "bytes": 4 * expect}} and st.to_dict()["dtype"] == "float32"
    mod = "model.layers.0.self_attn.k_proj"  # 32 x 64 in the tiny model
    ranks = bank.ranks(mod)
    assert st.per_module[mod].params == sum(r * (64 + 32) for r in ranks)
    # A bf16 copy: bytes halve, params unchanged, dtype reported.
    write_peft_adapter(bank.adapters[0], tmp_path / "bf16", dtype=torch.bfloat16)
    bank2 = AdapterBank.load([tmp_path / "bf16", lib_mixed[1]])
    st0 = bank2.adapter_storage(0)
    assert st0.total.by_dtype == {"bfloat16": {"params": st0.params, "bytes": 2 * st0.params}}
    assert bank2.storage().total.by_dtype["float32"]["params"] == bank.adapter_storage(1).params
    assert bank2.storage().total.dtype == "mixed" and bank2.dtype == torch.float32  # outputs of a mixed bank: float32


def test_write_back_loads_in_peft_and_is_identical(lib_mixed, tiny_llama, tmp_path, tok_ids):
    bank = AdapterBank.load(lib_mixed)
    for i, name in enumerate(bank.names):
        out = bank.write_adapter(name, tmp_path / name)
        ref = PeftModel.from_pretrained(tiny_llama(0), str(lib_mixed[i]))
        new = PeftModel.from_pretrained(tiny_llama(0), str(out))
        with torch.no_grad():
            torch.testing.assert_close(new(input_ids=tok_ids).logits, ref(input_ids=tok_ids).logits, rtol=0, atol=0)


def test_pickles_are_never_loaded(lib4, tmp_path):
    """A folder with only adapter_model.bin gets a clear error; the pickle is not even opened."""
    dst = tmp_path / "legacy"
    dst.mkdir()
    shutil.copy(lib4[0] / "adapter_config.json", dst)
    marker = tmp_path / "unpickled"
    torch.save({"k": _Evil(marker)}, dst / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.bin: pickled PyTorch weights; romscale never loads pickles.*safetensors"):
        read_peft_adapter(dst)
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---- bad input ------------------------------------------------------------------------------------
def test_different_base_models(lib4, make_lora, tmp_path):
    other = make_lora(tmp_path / "other", 9, base_name="someone/else")
    with pytest.raises(AdapterError, match="different base models.*someone/else"):
        AdapterBank.load([lib4[0], other])
    AdapterBank.load([lib4[0], other], allow_base_mismatch=True)  # explicit opt-in
    # Same name, different shapes: caught by shapes.
    wide = make_lora(tmp_path / "wide", 9, hidden=32)
    with pytest.raises(AdapterError, match=r"wide: module model.layers.0.self_attn.k_proj is 16x32 .*but 32x64"):
        AdapterBank.load([lib4[0], wide])


def test_mismatched_target_modules(lib4, make_lora, tmp_path):
    qv = make_lora(tmp_path / "qv", 5, targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match=r"qv: adapted modules differ.*missing \['model.layers.0.self_attn.k_proj'"):
        AdapterBank.load([lib4[0], qv])


def test_non_lora_peft_type(tiny_llama, tmp_path):
    pm = get_peft_model(tiny_llama(0), IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match=r"adapter_config.json: peft_type is 'IA3'; only LoRA"):
        read_peft_adapter(tmp_path / "ia3")


def test_dora_and_modules_to_save_refused(tiny_llama, tmp_path):
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
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
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


# ---- hostile input ------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_symbolic_links_are_not_followed(lib4, tmp_path, name):
    d = _copy(lib4[0], tmp_path / "d")
    outside = tmp_path / f"outside-{name}"
    (d / name).rename(outside)
    os.symlink(outside, d / name)
    with pytest.raises(AdapterError, match=f"{name} is a symbolic link"):
        read_peft_adapter(d)


def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_sizes_checked_before_allocating(lib4, tmp_path):
    d = _copy(lib4[0], tmp_path / "d")
    st = d / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    # A header that claims a 4 TB tensor in a tiny file is refused before anything is allocated.
    _header_file(st, {key: {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}, b"\0" * 16)
    with pytest.raises(AdapterError, match="does not fit its shape.*corrupt or truncated"):
        read_peft_adapter(d)
    _header_file(st, {key: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)  # 16 bytes needed
    with pytest.raises(AdapterError, match="does not fit its shape"):
        read_peft_adapter(d)
    st.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # header length beyond the file
    with pytest.raises(AdapterError, match="a header of .* bytes in a file of 10.*corrupt or truncated"):
        read_peft_adapter(d)
    _header_file(st, {key: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": "not an entry"}, b"\0" * 8)
    with pytest.raises(AdapterError, match="entry 'x' needs a known dtype"):
        read_peft_adapter(d)


def test_romscale_written_adapters_are_checked_third_party_ones_are_read(lib4, tmp_path):
    bank = AdapterBank.load(lib4)
    out = bank.write_adapter(bank.names[0], tmp_path / "ours")
    assert output_kind(out) == "peft-adapter" and sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "adapter_config.json", "adapter_model.safetensors"])
    assert not (lib4[0] / MANIFEST).exists()  # a folder PEFT wrote: read without a manifest
    read_peft_adapter(out)
    st = out / "adapter_model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-3] ^= 1
    st.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="does not match its sha256"):
        read_peft_adapter(out)
    st.write_bytes(bytes(raw[:-1]))
    with pytest.raises(AdapterError, match="truncated or replaced"):
        read_peft_adapter(out)
    (out / "notes.txt").write_text("x")
    with pytest.raises(AdapterError, match="not listed in romscale_manifest.json"):
        read_peft_adapter(out)


# ---- outputs ----------------------------------------------------------------------------------------
def test_outputs_never_overwrite_inputs(lib4, tree_hash):
    bank = AdapterBank.load(lib4)
    before = {p: tree_hash(p) for p in lib4}
    with pytest.raises(OutputError, match="is the input .*never writes over or into its inputs"):
        bank.write_adapter(bank.names[0], lib4[0], overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        bank.write_adapter(bank.names[0], lib4[0].parent, overwrite=True)  # a folder containing inputs
    with pytest.raises(OutputError, match="lies inside the input"):
        bank.write_adapter(bank.names[0], lib4[1] / "copy")
    assert not (lib4[1] / "copy").exists()
    # The adapter's own source is an input too, even when the caller names none.
    with pytest.raises(OutputError, match="is the input"):
        write_peft_adapter(bank.adapters[2], lib4[2], overwrite=True)
    assert {p: tree_hash(p) for p in lib4} == before


def test_existing_targets_are_replaced_only_if_romscale_wrote_them(lib4, tmp_path, tree_hash):
    bank = AdapterBank.load(lib4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match="not a romscale output"):
        bank.write_adapter(bank.names[0], foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "mine"
    peft_folder = _copy(lib4[0], tmp_path / "peft_written")  # an adapter, but not written by romscale
    with pytest.raises(OutputError, match="not a romscale output"):
        bank.write_adapter(bank.names[1], peft_folder, overwrite=True)
    out = bank.write_adapter(bank.names[0], tmp_path / "out")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        bank.write_adapter(bank.names[1], out)
    bank.write_adapter(bank.names[1], out, overwrite=True)
    assert torch.equal(read_peft_adapter(out).modules[bank.modules[0]].A, bank.adapters[1].modules[bank.modules[0]].A)


def test_failed_write_keeps_previous_output(lib4, tmp_path, monkeypatch, tree_hash):
    bank = AdapterBank.load(lib4)
    out = bank.write_adapter(bank.names[0], tmp_path / "out")
    good = tree_hash(out)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.write_adapter(bank.names[1], out, overwrite=True)
    assert tree_hash(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders or locks left behind


def test_bank_rejects_duplicate_names_and_empty(lib4):
    a = read_peft_adapter(lib4[0])
    with pytest.raises(AdapterError, match="unique"):
        AdapterBank([a, a])
    with pytest.raises(AdapterError, match="at least one"):
        AdapterBank([])


def test_colliding_folder_names_made_unique(make_lora, tmp_path):
    p1 = make_lora(tmp_path / "x" / "final", 1)
    p2 = make_lora(tmp_path / "y" / "final", 2)
    assert AdapterBank.load([p1, p2]).names == ["x__final", "y__final"]


def test_lora_module_delta_matches_peft(lib_mixed, tiny_llama):
    a = read_peft_adapter(lib_mixed[1])
    pm = PeftModel.from_pretrained(tiny_llama(0), str(lib_mixed[1]))
    mod = pm.get_submodule("base_model.model.model.layers.0.self_attn.k_proj")
    lm: LoraModule = a.modules["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(lm.delta(), mod.get_delta_weight("default"))
    assert isinstance(a, LoraAdapter)
