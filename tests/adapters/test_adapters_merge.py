"""Merge methods: parity with PEFT's add_weighted_adapter (fp16 adapters with tied magnitudes, DARE
masks from the same seed), loadability, intended updates, output dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors
import torch
from peft import PeftModel
from peft.utils.merge_utils import magnitude_based_pruning

from romscale.adapters.bank import AdapterBank
from romscale.adapters.merge import MERGE_METHODS, MergeOptions, merge_adapters
from romscale.adapters.ops import kth_largest_abs, random_drop, top_k_mask, trim_magnitude
from romscale.adapters.order import model_order, natural_key
from romscale.adapters.peft_io import write_peft_adapter
from romscale.errors import AdapterError, RomscaleError

WEIGHTS = [0.7, -0.4, 1.1, 0.5]
DENSITY = 0.6

PARITY = [  # (ours, PEFT combination_type): every type add_weighted_adapter offers
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


def _deltas(pm, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): m.get_delta_weight(adapter)
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and adapter in m.lora_A
    }


def _peft_merge(tiny_llama, paths, ctype, seed, density=DENSITY):
    """PEFT's own merge, seeded the way a user seeds it."""
    pm = PeftModel.from_pretrained(tiny_llama(0), str(paths[0]), adapter_name="t0")
    for i in range(1, len(paths)):
        pm.load_adapter(str(paths[i]), adapter_name=f"t{i}")
    torch.manual_seed(seed)
    kw = {"density": density} if ctype not in ("cat", "svd", "linear") else {}
    pm.add_weighted_adapter([f"t{i}" for i in range(len(paths))], WEIGHTS[: len(paths)], "merged", combination_type=ctype, **kw)
    return _deltas(pm, "merged")


def _products(res) -> dict[str, torch.Tensor]:
    return {m: lm.B.float() @ lm.A.float() for m, lm in res.adapter.modules.items()}


def _assert_same(got: dict, ref: dict, svd: bool = False) -> None:
    """Equal up to float rounding; a rank-truncated (SVD) result up to 1e-4 of its largest entry: the
    truncated subspace depends on the LAPACK path of the CPU (1.7e-5 seen on an Intel Xeon where an
    AMD EPYC gave < 1e-5)."""
    assert set(got) == set(ref)
    for m in ref:
        scale = float(ref[m].abs().max())
        torch.testing.assert_close(got[m], ref[m], rtol=1e-4, atol=(1e-4 if svd else 1e-5) * scale)


def _ties_at_threshold(bank: AdapterBank, method: str) -> bool:
    """The library really has entries tied at the k-th magnitude (where keep-all-ties differs)."""
    for mod in bank.modules:
        st = bank.stack(mod)
        tensors = st.A + st.B if MERGE_METHODS[method].family == "ab" else [st.delta(t) for t in range(st.n)]
        for x in tensors:
            k = int(DENSITY * x.numel())
            if int((x.float().abs() >= kth_largest_abs(x.float(), k)).sum()) > k:
                return True
    return False


@pytest.mark.parametrize("ours,peft_type", PARITY)
def test_parity_with_peft_on_fp16_adapters_with_ties(ours, peft_type, lib_fp16_ties, tiny_llama, tmp_path):
    """Same seed, same result, for every PEFT combination type: trimming keeps exactly PEFT's top-k
    entries although magnitudes tie, DARE draws its masks in the model's module order."""
    assert MERGE_METHODS[ours].peft_name == peft_type
    bank = AdapterBank.load(lib_fp16_ties)
    assert bank.dtype == torch.float16 and bank.modules[:4] == [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if "ties" in ours or "magnitude" in ours:
        assert _ties_at_threshold(bank, ours)
    ref = _peft_merge(tiny_llama, lib_fp16_ties, peft_type, seed=5)
    opts = MergeOptions(weights=WEIGHTS, density=DENSITY, seed=5, rng="torch", dtype="float32")
    res = merge_adapters(bank, ours, opts)
    out = write_peft_adapter(res.adapter, tmp_path / ours, inputs=lib_fp16_ties)
    _assert_same(_deltas(PeftModel.from_pretrained(tiny_llama(0), str(out)), "default"), ref, svd="svd" in peft_type)
    if MERGE_METHODS[ours].random:  # the seed matters: another one gives other masks
        other = merge_adapters(bank, ours, MergeOptions(weights=WEIGHTS, density=DENSITY, seed=6, rng="torch", dtype="float32"))
        assert any(not torch.allclose(_products(other)[m], ref[m], atol=1e-6) for m in ref)


@pytest.mark.parametrize("method", ["dare_ties_ab", "dare_linear"])
def test_dare_draws_follow_the_model_module_order(method, lib_fp16_ties, tiny_llama):
    bank = AdapterBank.load(lib_fp16_ties)
    assert bank.modules == model_order(tiny_llama(0), bank.modules)  # q, k, v, o: the model's order
    ref = _peft_merge(tiny_llama, lib_fp16_ties, MERGE_METHODS[method].peft_name, seed=3)
    opts = MergeOptions(weights=WEIGHTS, density=DENSITY, seed=3, rng="torch", dtype="float32")
    _assert_same(_products(merge_adapters(bank, method, opts)), ref)
    # Sorted names (k, o, q, v) draw the same masks for other modules: not PEFT's merge.
    by_name = AdapterBank.load(lib_fp16_ties, module_order=sorted(bank.modules, key=natural_key))
    got = _products(merge_adapters(by_name, method, opts))
    assert all(not torch.allclose(got[m], ref[m], atol=1e-4) for m in ref)


@pytest.mark.parametrize("method,extra", [("dare_ties_ab", []), ("dare_linear", ["--rng", "torch"])])
def test_cli_seed_reproduces_peft_dare(method, extra, cli, lib_fp16_ties, tiny_llama, tmp_path):
    ref = _peft_merge(tiny_llama, lib_fp16_ties, MERGE_METHODS[method].peft_name, seed=7)
    r = cli("adapters", "merge", *lib_fp16_ties, "--method", method, "--seed", "7", "--density", str(DENSITY),
            "--weights", ",".join(map(str, WEIGHTS)), "--dtype", "float32", *extra, "--out", tmp_path / "m")
    assert r.exit_code == 0, r
    _assert_same(_deltas(PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "m")), "default"), ref)


def test_torch_generator_replaces_peft_stream(lib_fp16_ties):
    """An explicit generator is PEFT's RNG state when it starts combining (no init draws replayed)."""
    bank = AdapterBank.load(lib_fp16_ties)
    opts = MergeOptions(density=DENSITY, seed=0)
    a = merge_adapters(bank, "dare_ties_ab", opts, torch_generator=torch.Generator().manual_seed(11))
    b = merge_adapters(bank, "dare_ties_ab", opts, torch_generator=torch.Generator().manual_seed(11))
    c = merge_adapters(bank, "dare_ties_ab", opts)
    m = bank.modules[0]
    assert torch.equal(_products(a)[m], _products(b)[m]) and not torch.equal(_products(a)[m], _products(c)[m])


def test_outputs_default_to_the_inputs_dtype(lib_fp16_ties, lib4, tmp_path):
    fp16 = AdapterBank.load(lib_fp16_ties)
    for method in ("ties", "ties_ab", "cat"):
        res = merge_adapters(fp16, method)
        assert {lm.A.dtype for lm in res.adapter.modules.values()} == {torch.float16}
        assert res.storage.bytes == 2 * res.storage.params and res.storage.total.dtype == "float16"
        s = res.summary(fp16.storage())
        assert s["storage"]["dtype"] == "float16" and s["storage_fraction_bytes"] == pytest.approx(s["storage_fraction_params"])
        out = write_peft_adapter(res.adapter, tmp_path / method)
        with safetensors.safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    res = merge_adapters(AdapterBank.load(lib4), "ties")
    assert res.storage.bytes == 4 * res.storage.params
    # An fp16 merge of an fp32 library is half the bytes of the same merge in fp32.
    half = merge_adapters(AdapterBank.load(lib4), "ties", MergeOptions(dtype="float16"))
    assert half.storage.params == res.storage.params and 2 * half.storage.bytes == res.storage.bytes


def _patched_logits(tiny_llama, deltas: dict[str, torch.Tensor], tok_ids: torch.Tensor) -> torch.Tensor:
    model = tiny_llama(0)
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_submodule(name).weight += d
        return model(input_ids=tok_ids).logits


def test_exact_sums_apply_the_intended_update(lib_mixed, tiny_llama, tmp_path, tok_ids):
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
            torch.testing.assert_close(pm(input_ids=tok_ids).logits, _patched_logits(tiny_llama, intended, tok_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_loads_in_peft_and_applies_its_update(method, lib4, tiny_llama, tmp_path, tok_ids):
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
        torch.testing.assert_close(pm(input_ids=tok_ids).logits, _patched_logits(tiny_llama, deltas, tok_ids), rtol=1e-4, atol=1e-4)
    rank = max(bank.ranks(bank.modules[0]))
    expect_rank = 4 * rank if method == "cat" else rank
    assert {lm.r for lm in res.adapter.modules.values()} == {expect_rank}
    assert res.storage.params == sum(expect_rank * (sum(bank.shapes[m])) for m in bank.modules)


def test_rslora_inputs_merge_correctly(make_lora, tiny_llama, tmp_path):
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trim_keeps_exactly_peft_top_k(density, dtype):
    """Random values, and fp16 values with most magnitudes tied: the same entries as PEFT's topk."""
    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(37, 53, generator=g), torch.randint(-4, 5, (37, 53), generator=g) / 8.0):
        t = t.to(dtype)
        got = trim_magnitude(t, density)
        ref = magnitude_based_pruning(t, density) if density < 1 else t
        assert torch.equal(got, ref)
        if density < 1:
            k = int(density * t.numel())
            assert int(top_k_mask(t, k).sum()) == k


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
    for bad in (1.5, 0.0):
        with pytest.raises(RomscaleError, match=r"density must be in \(0, 1\]"):
            merge_adapters(bank, "ties", MergeOptions(density=bad))
    with pytest.raises(RomscaleError, match="dtype must be one of"):
        merge_adapters(bank, "ties", MergeOptions(dtype="int8"))


def test_merge_outputs_in_half_precision(lib4, tmp_path):
    bank = AdapterBank.load(lib4)
    res = merge_adapters(bank, "task_arithmetic", MergeOptions(dtype="bfloat16"))
    out = write_peft_adapter(res.adapter, tmp_path / "bf16")
    back = AdapterBank.load([out])
    st = back.storage()
    assert set(st.total.by_dtype) == {"bfloat16"} and st.bytes == 2 * st.params == res.storage.bytes


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


def test_merge_device_must_exist():
    import torch

    from romscale.adapters.merge import MergeOptions, merge_device

    assert merge_device(MergeOptions()).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RomscaleError, match="no CUDA device"):
            merge_device(MergeOptions(device="cuda"))
    with pytest.raises(RomscaleError, match="torch device"):
        merge_device(MergeOptions(device="warp-drive"))


def test_batched_ties_equals_the_per_module_merge(lib4):
    """The accelerator path (modules of one shape in one batch) against the per-module TIES, run on
    the CPU here: the same merged updates up to float rounding."""
    from romscale.adapters.batched import ties_group

    bank = AdapterBank.load(lib4)
    ref = merge_adapters(bank, "ties", MergeOptions(density=0.5)).adapter
    groups: dict = {}
    for mod in bank.modules:
        st = bank.stack(mod)
        groups.setdefault((st.d_out, st.d_in), []).append((mod, st))
    assert max(len(g) for g in groups.values()) > 1  # a real batch
    for group in groups.values():
        merged = ties_group([st for _, st in group], torch.ones(bank.n), density=0.5, sign_method="total", rank=4)
        for (mod, st), (A, B) in zip(group, merged):
            want = ref.modules[mod].B.double() @ ref.modules[mod].A.double()
            assert A.shape == (4, st.d_in) and B.shape == (st.d_out, 4)
            torch.testing.assert_close(B.double() @ A.double(), want, rtol=1e-4, atol=1e-6)


def _ties_like(n_out: int, n_in: int, count: int, seed: int) -> torch.Tensor:
    """count sums of trimmed rank-4 updates, the spectrum shape a TIES merge produces; float64."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(count):
        parts = [(torch.randn(n_out, 4, generator=g) @ torch.randn(4, n_in, generator=g)) * (torch.rand(n_out, n_in, generator=g) > 0.5)
                 for _ in range(3)]
        mats.append(sum(parts))
    return torch.stack(mats).double()


@pytest.mark.parametrize("shape", [(96, 80), (72, 200)])  # Grams of 80 and 72: above 2p = 64, so iterated
def test_subspace_eigenvectors_give_the_eigh_truncation(shape):
    """The accelerator's iterative top-k eigenvectors (romscale.adapters.batched) span the same
    subspace as the full eigh: the same rank-k products, here on the CPU; also for a zero update and
    a rank-deficient one (Householder fallback), and with max_iter too small (exact fallback)."""
    from romscale.adapters.batched import top_eigenvectors, truncate_group

    X = _ties_like(*shape, count=3, seed=0)
    X[1] = 0.0  # an all-zero update (an untrained module)
    X[2] = X[2, :, :3] @ torch.randn(3, shape[1], dtype=torch.float64)  # rank 3 < p
    G = X @ X.transpose(1, 2) if shape[0] <= shape[1] else X.transpose(1, 2) @ X
    k = 6
    ref = top_eigenvectors(G, k, method="eigh")
    for kwargs in ({}, {"max_iter": 2}):
        got = top_eigenvectors(G, k, method="subspace", **kwargs)
        assert got.shape == ref.shape
        torch.testing.assert_close(got.transpose(1, 2) @ got, torch.eye(k, dtype=torch.float64).expand(3, k, k), atol=1e-9, rtol=0)
        for m in (0, 2):
            P, Pr = got[m] @ got[m].T, ref[m] @ ref[m].T
            if m == 2:  # rank 3: only the 3 non-null directions are defined
                P, Pr = P @ G[m], Pr @ G[m]
            torch.testing.assert_close(P, Pr, atol=1e-8, rtol=0)
    want = truncate_group(X.float(), k, eig="eigh")
    for (a, b), (ra, rb) in zip(truncate_group(X.float(), k, eig="subspace"), want):
        torch.testing.assert_close(b @ a, rb @ ra, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        top_eigenvectors(G, k, method="lanczos")
