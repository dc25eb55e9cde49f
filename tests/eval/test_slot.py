"""AdapterSlot: any adapter copied into one PEFT slot gives PEFT's own logits; None is the base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from romscale.adapters.peft_io import read_peft_adapter
from romscale.errors import AdapterError
from romscale.eval.slot import AdapterSlot


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(tiny_llama, folder, ids):
    return _logits(PeftModel.from_pretrained(tiny_llama(0), str(folder)).eval(), ids)


def test_none_is_exactly_the_base_model(tiny_llama, lib4, tok_ids):
    model = tiny_llama(0)
    ref = _logits(model, tok_ids)
    slot = AdapterSlot(model, rank=8)
    assert torch.equal(_logits(slot.peft_model, tok_ids), ref)
    slot.set(read_peft_adapter(lib4[0]))
    assert not torch.allclose(_logits(slot.peft_model, tok_ids), ref)
    slot.set(None)
    assert torch.equal(_logits(slot.peft_model, tok_ids), ref)
    assert slot.current is None


def test_set_matches_peft_from_pretrained(tiny_llama, lib4, lib_mixed, tok_ids):
    slot = AdapterSlot(tiny_llama(0), rank=8)
    # mixed ranks (4, 8, 6 with a rank-2 module), alphas, rsLoRA: scaling folded in, zero-padded to 8
    for folder in [*lib_mixed, lib4[1], lib_mixed[1], lib4[0]]:
        slot.set(read_peft_adapter(folder))
        got = _logits(slot.peft_model, tok_ids)
        torch.testing.assert_close(got, _peft_logits(tiny_llama, folder, tok_ids), rtol=1e-5, atol=1e-5)


def test_set_covers_a_subset_of_modules(tiny_llama, make_lora, tmp_path, tok_ids):
    folder = make_lora(tmp_path / "qv", seed=5, targets=("q_proj", "v_proj"))
    slot = AdapterSlot(tiny_llama(0), rank=4)
    slot.set(read_peft_adapter(folder))
    torch.testing.assert_close(_logits(slot.peft_model, tok_ids), _peft_logits(tiny_llama, folder, tok_ids), rtol=1e-5, atol=1e-5)


def test_merged_into_weights_restores_bit_for_bit(tiny_llama, lib4, tok_ids):
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slot = AdapterSlot(model, rank=4)
    a, b = read_peft_adapter(lib4[0]), read_peft_adapter(lib4[1])
    slot.set(a)
    with_a = _logits(slot.peft_model, tok_ids)
    with slot.merged_into_weights(b):
        merged = _logits(slot.peft_model, tok_ids)
    torch.testing.assert_close(merged, _peft_logits(tiny_llama, lib4[1], tok_ids), rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(slot.peft_model, tok_ids), with_a)  # the slot's adapter is back
    after = {k.replace(".base_layer", ""): v for k, v in slot.base.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError), slot.merged_into_weights(b):  # restored on errors too
        raise RuntimeError("boom")
    assert torch.equal(_logits(slot.peft_model, tok_ids), with_a)


def test_bad_adapters_are_clear_errors(tiny_llama, make_lora, lib4, tmp_path):
    slot = AdapterSlot(tiny_llama(0), rank=2)
    with pytest.raises(AdapterError, match="rank 4, more than the slot's 2"):
        slot.set(read_peft_adapter(lib4[0]))
    small = make_lora(tmp_path / "h32", seed=1, hidden=32)
    slot4 = AdapterSlot(tiny_llama(0), rank=4)
    with pytest.raises(AdapterError, match="belongs to another base model"):
        slot4.set(read_peft_adapter(small))
    qv = AdapterSlot(tiny_llama(0), target_modules=("q_proj", "v_proj"), rank=4)
    with pytest.raises(AdapterError, match="does not have"):
        qv.set(read_peft_adapter(lib4[0]))
    with pytest.raises(AdapterError, match="already holds LoRA"):
        AdapterSlot(slot4.base)
    with pytest.raises(AdapterError, match="cannot put a LoRA slot"):
        AdapterSlot(tiny_llama(0), target_modules=("nope_proj",))
