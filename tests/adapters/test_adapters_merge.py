"""Merge methods: parity with PEFT's add_weighted_adapter, loadability, intended updates."""

from __future__ import annotations

import math

import numpy as np
import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from adapters_helpers import lib4, lib_mixed, lib_qv, make_lora, tiny_llama, tok_ids  # noqa: F401 (fixtures)
from peft import PeftModel
from peft.utils.merge_utils import magnitude_based_pruning

from romscale.adapters.bank import AdapterBank
from romscale.adapters.merge import MERGE_METHODS, MergeOptions, merge_adapters
from romscale.adapters.ops import random_drop, trim_magnitude
from romscale.adapters.peft_io import write_peft_adapter
from romscale.errors import AdapterError, RomscaleError

WEIGHTS = [0.7, -0.4, 1.1, 0.5]


def _deltas(pm, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): m.get_delta_weight(adapter)
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and adapter in m.lora_A
    }


def _peft_merge(paths, ctype, weights, density, monkeypatch):
    """PEFT's own merge; records the global RNG state when PEFT starts combining (after it has
    initialised the new adapter's layers), so that random methods can be replayed draw for draw."""
    pm = PeftModel.from_pretrained(tiny_llama(0), str(paths[0]), adapter_name="t0")
    for i in range(1, len(paths)):
        pm.load_adapter(str(paths[i]), adapter_name=f"t{i}")
    state = {}
    for fn in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        orig = getattr(peft_lora_model.LoraModel, fn)

        def wrap(self, *a, _orig=orig, **k):
            state.setdefault("rng", torch.get_rng_state())
            return _orig(self, *a, **k)

        monkeypatch.setattr(peft_lora_model.LoraModel, fn, wrap)
    torch.manual_seed(1234)
    kw = {"density": density} if density is not None else {}
    pm.add_weighted_adapter([f"t{i}" for i in range(len(paths))], list(weights), "merged", combination_type=ctype, **kw)
    return _deltas(pm, "merged"), state.get("rng")


def _ours(paths, method, weights, density, rng_state, tmp_path):
    bank = AdapterBank.load(paths)
    g = None
    if rng_state is not None:
        g = torch.Generator()
        g.set_state(rng_state)
    res = merge_adapters(bank, method, MergeOptions(weights=weights, density=density or 0.5, rng="torch"), torch_generator=g)
    out = write_peft_adapter(res.adapter, tmp_path / method)
    return _deltas(PeftModel.from_pretrained(tiny_llama(0), str(out)), "default")


PARITY = [  # (ours, PEFT combination_type)
    ("cat", "cat"),
    ("task_arithmetic", "svd"),
    ("linear_ab", "linear"),
    ("ties_ab", "ties"),
    ("dare_linear_ab", "dare_linear"),
    ("dare_ties_ab", "dare_ties"),
    ("magnitude_prune_ab", "magnitude_prune"),
    ("ties", "ties_svd"),
    ("dare_linear", "dare_linear_svd"),
    ("dare_ties", "dare_ties_svd"),
    ("magnitude_prune", "magnitude_prune_svd"),
]


@pytest.mark.parametrize("ours,peft_type", PARITY)
def test_parity_with_peft_add_weighted_adapter(ours, peft_type, lib4, lib_qv, tmp_path, monkeypatch):
    assert MERGE_METHODS[ours].peft_name == peft_type
    random = MERGE_METHODS[ours].random
    paths = lib_qv if random else lib4  # DARE replay needs the model's module order (q before v)
    w = WEIGHTS[: len(paths)]
    density = 0.6 if MERGE_METHODS[ours].uses_density else None
    ref, rng_state = _peft_merge(paths, peft_type, w, density, monkeypatch)
    got = _ours(paths, ours, w, density, rng_state if random else None, tmp_path)
    assert set(got) == set(ref)
    for m in ref:
        torch.testing.assert_close(got[m], ref[m], rtol=1e-4, atol=1e-5 * float(ref[m].abs().max()))
    if random:  # and the replay matters: another stream gives another result
        other = _ours(paths, ours, w, density, None, tmp_path / "other")
        assert any(not torch.allclose(other[m], ref[m], atol=1e-6) for m in ref)


def _patched_logits(deltas: dict[str, torch.Tensor], tok_ids: torch.Tensor) -> torch.Tensor:
    model = tiny_llama(0)
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_submodule(name).weight += d
        return model(input_ids=tok_ids).logits


def test_exact_sums_apply_the_intended_update(lib_mixed, tmp_path, tok_ids):
    """cat and untruncated task arithmetic give W + sum_t w_t s_t B_t A_t, rsLoRA scaling included."""
    bank = AdapterBank.load(lib_mixed)
    w = [0.5, -1.0, 2.0]
    intended = {m: sum(w[t] * bank.stack(m).delta(t) for t in range(bank.n)) for m in bank.modules}
    for method, opts in (("cat", MergeOptions(weights=w)), ("task_arithmetic", MergeOptions(weights=w, rank=64))):
        res = merge_adapters(bank, method, opts)
        out = write_peft_adapter(res.adapter, tmp_path / method)
        pm = PeftModel.from_pretrained(tiny_llama(0), str(out))
        for m, d in _deltas(pm, "default").items():
            torch.testing.assert_close(d, intended[m], rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=tok_ids).logits, _patched_logits(intended, tok_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_loads_in_peft_and_applies_its_update(method, lib4, tmp_path, tok_ids):
    bank = AdapterBank.load(lib4)
    res = merge_adapters(bank, method, MergeOptions(density=0.5, seed=3))
    out = write_peft_adapter(res.adapter, tmp_path / method)
    pm = PeftModel.from_pretrained(tiny_llama(0), str(out))
    deltas = _deltas(pm, "default")
    assert set(deltas) == set(bank.modules)
    for m, lm in res.adapter.modules.items():
        torch.testing.assert_close(deltas[m], lm.B @ lm.A)  # scaling 1, whatever rank
        assert float(deltas[m].norm()) > 0
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=tok_ids).logits, _patched_logits(deltas, tok_ids), rtol=1e-4, atol=1e-4)
    rank = max(bank.ranks(bank.modules[0]))
    expect_rank = 4 * rank if method == "cat" else rank
    assert {lm.r for lm in res.adapter.modules.values()} == {expect_rank}
    assert res.storage.params == sum(expect_rank * (sum(bank.shapes[m])) for m in bank.modules)


def test_rslora_inputs_merge_correctly(tmp_path):
    """PEFT's merged config inherits use_rslora with lora_alpha = r (scaling sqrt(r), not 1); ours
    writes scaling 1, so the merged update is what the weights say."""
    paths = [make_lora(tmp_path / f"rs{i}", 50 + i, r=8, alpha=4, use_rslora=True) for i in range(2)]
    bank = AdapterBank.load(paths)
    res = merge_adapters(bank, "cat", MergeOptions(weights=[1.0, 1.0]))
    out = write_peft_adapter(res.adapter, tmp_path / "cat")
    got = _deltas(PeftModel.from_pretrained(tiny_llama(0), str(out)), "default")
    for m in bank.modules:
        st = bank.stack(m)
        assert st.scaling[0] == pytest.approx(4 / math.sqrt(8))
        torch.testing.assert_close(got[m], st.delta(0) + st.delta(1), rtol=1e-5, atol=1e-7)


def test_ab_family_needs_one_rank(lib_mixed):
    bank = AdapterBank.load(lib_mixed)
    with pytest.raises(AdapterError, match="A/B-separate merges need one rank"):
        merge_adapters(bank, "ties_ab")
    merge_adapters(bank, "ties")  # update space handles different ranks


def test_knots_linear_untruncated_is_task_arithmetic(lib4):
    bank = AdapterBank.load(lib4)
    w = [0.3, 0.2, -0.5, 1.0]
    kn = merge_adapters(bank, "knots", MergeOptions(weights=w, knots_inner="linear", rank=64))
    for m in bank.modules:
        ta = sum(w[t] * bank.stack(m).delta(t) for t in range(bank.n))
        lm = kn.adapter.modules[m]
        torch.testing.assert_close(lm.B @ lm.A, ta, rtol=1e-4, atol=1e-6)
    # With TIES on the coordinates the result is a different (sparser-in-V) merge.
    kt = merge_adapters(bank, "knots", MergeOptions(weights=[1.0] * 4, density=0.3))
    m0 = bank.modules[0]
    assert not torch.allclose(kt.adapter.modules[m0].B @ kt.adapter.modules[m0].A, kn.adapter.modules[m0].B @ kn.adapter.modules[m0].A)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_trim_matches_peft(density):
    t = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trim_magnitude(t, density), magnitude_based_pruning(t, density) if density < 1 else t)


def test_fast_random_drop():
    t = torch.ones(200_000)
    a = random_drop(t, 0.3, np.random.default_rng(5))
    b = random_drop(t, 0.3, np.random.default_rng(5))
    c = random_drop(t, 0.3, np.random.default_rng(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = float((a > 0).float().mean())
    assert abs(kept - 0.3) < 0.01 and float(a.max()) == pytest.approx(1 / 0.3)
    assert abs(float(a.mean()) - 1.0) < 0.03  # unbiased after rescaling


def test_merge_argument_errors(lib4):
    bank = AdapterBank.load(lib4)
    with pytest.raises(RomscaleError, match="unknown merge method 'tie'.*available"):
        merge_adapters(bank, "tie")
    with pytest.raises(RomscaleError, match="got 2 weights for 4 adapters"):
        merge_adapters(bank, "ties", MergeOptions(weights=[1, 2]))
    with pytest.raises(RomscaleError, match="density"):
        merge_adapters(bank, "ties", MergeOptions(density=1.5))


def test_merge_outputs_in_half_precision(lib4, tmp_path):
    bank = AdapterBank.load(lib4)
    res = merge_adapters(bank, "task_arithmetic")
    out = write_peft_adapter(res.adapter, tmp_path / "bf16", dtype=torch.bfloat16)
    back = AdapterBank.load([out])
    st = back.storage()
    assert set(st.total.by_dtype) == {"bfloat16"} and st.bytes == 2 * st.params == 2 * res.storage.params


@pytest.mark.parametrize("method", ["dare_ties", "ties", "knots"])
def test_results_do_not_depend_on_worker_threads(method, lib4):
    bank = AdapterBank.load(lib4)
    opts = MergeOptions(density=0.4, seed=11)
    one = merge_adapters(bank, method, opts, workers=1).adapter
    two = merge_adapters(bank, method, opts, workers=2).adapter
    for m in bank.modules:
        torch.testing.assert_close(one.modules[m].B @ one.modules[m].A, two.modules[m].B @ two.modules[m].A, rtol=1e-5, atol=1e-7)
    if method == "dare_ties":
        other = merge_adapters(bank, method, MergeOptions(density=0.4, seed=12)).adapter
        m = bank.modules[0]
        assert not torch.allclose(other.modules[m].B @ other.modules[m].A, one.modules[m].B @ one.modules[m].A)
