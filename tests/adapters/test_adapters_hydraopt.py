"""HydraOpt: closed forms, exact recovery, monotone budgets, storage in bytes and params, ALS,
data-aware term, bundle files (romscale outputs), exports and PEFT loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from romscale.adapters.activations import collect_input_factors
from romscale.adapters.bank import AdapterBank
from romscale.adapters.bundle import FACTORS, HydraBundle
from romscale.adapters.hydraopt import HydraOptConfig, ModuleProblem, als_refine, fit_hydraopt, storage_params
from romscale.adapters.peft_io import LoraAdapter, LoraModule, read_peft_adapter
from romscale.errors import AdapterError, RomscaleError
from romscale.utils.outputs import MANIFEST, OutputError, output_kind

SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.k_proj": (32, 64), "model.layers.1.self_attn.o_proj": (64, 64)}


def synthetic_bank(A_of, B_of, n: int, r: int = 4, shapes=SHAPES) -> AdapterBank:
    """In-memory bank: task t at module m has A_of(t, m), B_of(t, m) (scaling 1)."""
    adapters = []
    for t in range(n):
        mods = {m: LoraModule(A=A_of(t, m), B=B_of(t, m), alpha=float(r)) for m in shapes}
        adapters.append(LoraAdapter(name=f"t{t}", config={"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "k_proj", "o_proj"], "base_model_name_or_path": "x"}, modules=mods))
    return AdapterBank(adapters)


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed(m: str) -> int:
    return sum(map(ord, m))


@pytest.fixture(scope="module")
def lib6(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("lib6")
    return [make_lora(root / f"task{i}", seed=300 + i, r=4) for i in range(6)]


def dense_errors(bank: AdapterBank, bundle: HydraBundle) -> np.ndarray:
    """(modules, tasks) relative errors computed densely, independently of the factored code."""
    out = np.zeros((len(bank.modules), bank.n))
    for i, m in enumerate(bank.modules):
        st = bank.stack(m)
        for t, name in enumerate(bank.names):
            A, B = bundle.task_factors(name)[m]
            dW = st.delta(t, torch.float64)
            out[i, t] = float((dW - B.double() @ A.double()).norm() / dW.norm())
    return out


def test_exact_recovery_when_tasks_share_A(make_lora, tiny_llama, tree_hash, tmp_path, tok_ids):
    mods = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    shared = {m: _rand(_seed(m), 4, 64) * 0.2 for m in mods}
    paths = [make_lora(tmp_path / f"s{i}", 400 + i, shared_A=shared) for i in range(5)]
    before = {p: tree_hash(p) for p in paths}
    bank = AdapterBank.load(paths)
    bundle = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=5))
    assert max(bundle.fit["task_errors"].values()) < 1e-6
    assert dense_errors(bank, bundle).max() < 1e-5
    # The storage target finds it too: one shared A + per-task B fits in (1+N)/(2N)-ish storage.
    frac = storage_params(bank, 1, 5) / bank.storage().params
    auto = fit_hydraopt(bank, HydraOptConfig(storage=frac + 1e-9))
    assert auto.fit["objective"] < 1e-12
    # Every task materialises as a PEFT adapter applying the original update.
    for i, name in enumerate(bank.names[:2]):
        out = bundle.export_task(name, tmp_path / "export" / name)
        got = PeftModel.from_pretrained(tiny_llama(0), str(out))
        ref = PeftModel.from_pretrained(tiny_llama(0), str(paths[i]))
        with torch.no_grad():
            torch.testing.assert_close(got(input_ids=tok_ids).logits, ref(input_ids=tok_ids).logits, rtol=1e-4, atol=1e-4)
    assert {p: tree_hash(p) for p in paths} == before  # inputs untouched


def test_exact_recovery_b_tree_when_tasks_share_B():
    bank = synthetic_bank(lambda t, m: _rand(10 * t + _seed(m), 4, SHAPES[m][1]), lambda t, m: _rand(_seed(m), SHAPES[m][0], 4), n=4)
    b = fit_hydraopt(bank, HydraOptConfig(k_a=4, k_b=1))
    assert b.fit["chosen"]["tree"] == "b"
    assert max(b.fit["task_errors"].values()) < 1e-6


def test_error_never_increases_with_budget(lib6):
    bank = AdapterBank.load(lib6)
    lib = bank.storage().params
    lo = storage_params(bank, 1, 1) / lib
    prev = None
    objs = []
    for f in np.linspace(lo, 1.0, 14):
        b = fit_hydraopt(bank, HydraOptConfig(storage=float(f)))
        assert b.storage().params <= f * lib + 1e-6
        obj = b.fit["objective"]
        # The reported objective is the one the search minimised, and it matches the task errors.
        assert obj == pytest.approx(min(c["objective"] for c in b.fit["candidates"]), rel=1e-9, abs=1e-12)
        assert obj == pytest.approx(np.mean([e**2 for e in b.fit["task_errors"].values()]), rel=1e-6, abs=1e-12)
        if prev is not None:
            assert obj <= prev + 1e-12, (f, obj, prev)
        prev = obj
        objs.append(obj)
    assert objs[0] > 0.3 and objs[-1] < 1e-12  # a real trade-off, exact at full storage
    assert len(set(np.round(objs, 8))) >= 5


def test_storage_equals_formula(lib_mixed):
    bank = AdapterBank.load(lib_mixed)
    for cfg in (HydraOptConfig(k_a=1, k_b=3), HydraOptConfig(k_a=2, k_b=1, rank=5), HydraOptConfig(storage=0.7),
                HydraOptConfig(storage=0.55, factor_dtype="float16", storage_unit="params")):
        b = fit_hydraopt(bank, cfg)
        c = b.fit["chosen"]
        expect = 0
        for m, (d_out, d_in) in bank.shapes.items():
            r = max(bank.ranks(m))
            rho = cfg.rank if cfg.rank else int(round(c["rank_multiplier"] * r))
            rho = min(rho, d_in, d_out)
            expect += rho * (c["k_a"] * d_in + c["k_b"] * d_out)
            f = b.modules[m]
            assert tuple(f.A.shape) == (c["k_a"], rho, d_in) and tuple(f.B.shape) == (c["k_b"], d_out, rho)
        st = b.storage()
        assert st.params == expect == c["params"]
        assert st.bytes == expect * (2 if cfg.factor_dtype == "float16" else 4)


def test_shared_A_per_task_B_is_half_storage_on_square_modules(make_lora, tmp_path):
    n = 10
    paths = [make_lora(tmp_path / f"sq{i}", 500 + i, targets=("q_proj", "o_proj")) for i in range(n)]  # 64x64
    bank = AdapterBank.load(paths)
    b = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=n))
    frac = b.storage().params / bank.storage().params
    assert frac == pytest.approx((1 + n) / (2 * n))
    assert abs(frac - 0.5) <= 1 / (2 * n) + 1e-12


def test_closed_forms_match_dense_svd(lib6):
    bank = AdapterBank.load(lib6)
    n = bank.n
    per_task = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=n))
    single = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1))
    got_pt, got_1 = dense_errors(bank, per_task), dense_errors(bank, single)
    for i, m in enumerate(bank.modules):
        st = bank.stack(m)
        dW = [st.delta(t, torch.float64) for t in range(n)]
        c = [1 / float(d.norm()) ** 2 for d in dW]
        r = max(bank.ranks(m))
        # one shared A, per-task B: A = top-r right singular vectors of the stacked sqrt(c_t) dW_t
        V = torch.linalg.svd(torch.cat([d * c_t**0.5 for d, c_t in zip(dW, c)], 0))[2][:r]
        ref = [float((d - d @ V.T @ V).norm() / d.norm()) for d in dW]
        np.testing.assert_allclose(got_pt[i], ref, rtol=1e-6, atol=1e-9)
        # one shared A and B: best rank-r approximation of the weighted mean update
        M = sum(c_t * d for d, c_t in zip(dW, c)) / sum(c)
        U, S, Vh = torch.linalg.svd(M)
        Mr = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        np.testing.assert_allclose(got_1[i], [float((d - Mr).norm() / d.norm()) for d in dW], rtol=1e-6, atol=1e-9)


def test_als_crossed_groups_recover_and_never_increase():
    # Task (i, j) uses A_i and B_j: a crossed structure that no nested tree can represent.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (1, 1)]
    bank = synthetic_bank(lambda t, m: _rand(pairs[t][0] + 7 * _seed(m), 4, SHAPES[m][1]), lambda t, m: _rand(100 + pairs[t][1] + _seed(m), SHAPES[m][0], 4), n=6)
    crossed = fit_hydraopt(bank, HydraOptConfig(k_a=2, k_b=2, grouping="independent", als_iters=200, als_tol=1e-14))
    nested = fit_hydraopt(bank, HydraOptConfig(k_a=2, k_b=2))
    assert max(crossed.fit["task_errors"].values()) < 1e-5
    assert nested.fit["objective"] > 0.1
    # ALS history is non-increasing from any start.
    m = bank.modules[0]
    A, B = bank.stack(m).padded(torch.float64)
    P = ModuleProblem(A, B, torch.ones(6, dtype=torch.float64))
    g, k = np.array([0, 0, 1, 1, 0, 1]), np.array([0, 1, 1, 0, 1, 0])  # a wrong grouping on purpose
    At, Bt = _rand(1, 2, 4, A.shape[2]).double(), _rand(2, 2, B.shape[1], 4).double()
    _, _, hist = als_refine(P, g, k, At, Bt, iters=40, tol=0)
    assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]


def test_data_aware_term_trades_plain_error_for_error_on_inputs(lib6):
    bank = AdapterBank.load(lib6)
    rng = torch.Generator().manual_seed(0)
    inputs = {}
    for t in bank.names:  # each task's inputs live in its own 6-dim subspace
        basis = torch.randn(6, 64, generator=rng)
        inputs[t] = {m: torch.randn(40, 6, generator=rng) @ basis for m in bank.modules}
    plain = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1))
    aware = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1, data_weight=1.0), inputs=inputs)

    def data_err(b):
        errs = []
        for t, name in enumerate(bank.names):
            e = []
            for m in bank.modules:
                A, B = b.task_factors(name)[m]
                dW = bank.stack(m).delta(t, torch.float64)
                X = inputs[name][m].double().T
                e.append(float(((dW - B.double() @ A.double()) @ X).norm() / (dW @ X).norm()) ** 2)
            errs.append(np.mean(e))
        return np.mean(errs)

    assert data_err(aware) < 0.8 * data_err(plain)
    # The data-aware ALS never increases its own objective (CG A-steps included).
    m = bank.modules[1]
    A, B = bank.stack(m).padded(torch.float64)
    P = ModuleProblem(A, B, torch.ones(bank.n, dtype=torch.float64))
    F = [inputs[n][m].double() * (64 / float(inputs[n][m].double().square().sum())) ** 0.5 for n in bank.names]
    g, k = np.zeros(bank.n, dtype=np.int64), np.array([0, 0, 1, 1, 2, 2])
    At, Bt = P.tree_factors(g, k, 4)
    _, _, hist = als_refine(P, g, k, At, Bt, inputs=F, data_weight=0.8, iters=25, tol=0)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]
    assert aware.fit["objective"] >= plain.fit["objective"] - 1e-9  # plain closed form is optimal in plain error
    assert "task_errors_data" in aware.fit
    with pytest.raises(RomscaleError, match="needs inputs"):
        fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1, data_weight=0.5))


def test_collect_input_factors_and_end_to_end(lib4, tiny_llama, tok_ids):
    bank = AdapterBank.load(lib4)
    model = tiny_llama(0)
    examples = {name: [tok_ids[0].tolist(), tok_ids[1, :5].tolist()] for name in bank.names[:2]}
    facs = collect_input_factors(model, examples, bank.modules)
    # Reference Gram by hand for one module.
    mod = bank.modules[0]
    xs = []
    h = model.get_submodule(mod).register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ex in examples[bank.names[0]]:
            model(input_ids=torch.tensor([ex]))
    h.remove()
    X = torch.cat(xs).double()
    F = facs[bank.names[0]][mod].double()
    torch.testing.assert_close(F.T @ F, X.T @ X, rtol=1e-4, atol=1e-4 * float((X.T @ X).abs().max()))
    b = fit_hydraopt(bank, HydraOptConfig(storage=0.5, data_weight=0.5), inputs=facs)
    assert set(b.fit["task_errors_data"]) == set(bank.names)


def test_bundle_roundtrip_and_peft_loading(lib4, tiny_llama, tree_hash, tmp_path, tok_ids):
    before = {p: tree_hash(p) for p in lib4}
    bank = AdapterBank.load(lib4)
    b = fit_hydraopt(bank, HydraOptConfig(storage=0.5))
    path = b.save(tmp_path / "bundle", inputs=bank.sources)
    assert output_kind(path) == "hydraopt-bundle" and sorted(p.name for p in path.iterdir()) == [FACTORS, MANIFEST]
    b2 = HydraBundle.load(path)
    assert b2.tasks == b.tasks and b2.fit["objective"] == b.fit["objective"] and list(b2.modules) == bank.modules
    for m in b.modules:
        assert torch.equal(b.modules[m].A, b2.modules[m].A) and torch.equal(b.modules[m].B, b2.modules[m].B)
        assert (b.modules[m].a_group == b2.modules[m].a_group).all()
    # Straight from the bundle into a PEFT model == exported folder == base + B~A~.
    t0, t1 = b.tasks[0], b.tasks[2]
    direct = b2.load_into(tiny_llama(0), t0)
    exported = PeftModel.from_pretrained(tiny_llama(0), str(b2.export_task(t0, tmp_path / "t0")))
    patched = tiny_llama(0)
    with torch.no_grad():
        for m, (A, B) in b2.task_factors(t0).items():
            patched.get_submodule(m).weight += B @ A
        ref = patched(input_ids=tok_ids).logits
        torch.testing.assert_close(direct(input_ids=tok_ids).logits, exported(input_ids=tok_ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(direct(input_ids=tok_ids).logits, ref, rtol=1e-4, atol=1e-4)
        # A second task added to the same PeftModel, then switched to.
        b2.load_into(direct, t1, adapter_name="second")
        ex1 = PeftModel.from_pretrained(tiny_llama(0), str(b2.export_task(t1, tmp_path / "t1")))
        torch.testing.assert_close(direct(input_ids=tok_ids).logits, ex1(input_ids=tok_ids).logits, rtol=0, atol=0)
    assert {p: tree_hash(p) for p in lib4} == before
    with pytest.raises(OutputError, match="never writes over or into its inputs"):
        b.save(lib4[0], overwrite=True, inputs=bank.sources)
    with pytest.raises(OutputError, match="lies inside the input"):
        b2.export_task(t0, path / "inside")  # the bundle is an input of its exports


def test_export_all_is_one_output(lib4, tiny_llama, tmp_path, tok_ids):
    bank = AdapterBank.load(lib4)
    b = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=2))
    b.save(tmp_path / "bundle")
    b = HydraBundle.load(tmp_path / "bundle")
    out = b.export_all(tmp_path / "tasks")
    assert output_kind(out) == "peft-adapter-set" and sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *b.tasks])
    for t in b.tasks:
        ad = read_peft_adapter(out / t)
        for m, (A, B) in b.task_factors(t).items():
            assert torch.equal(ad.modules[m].A, A) and torch.equal(ad.modules[m].B, B)
        PeftModel.from_pretrained(tiny_llama(0), str(out / t))
    with pytest.raises(OutputError, match="already exists"):
        b.export_all(out)
    with pytest.raises(OutputError, match="is a romscale peft-adapter-set output, not a peft-adapter"):
        b.export_task(b.tasks[0], out, overwrite=True)
    b.export_all(out, overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        b.export_all(tmp_path, overwrite=True)


def _edit_section(path, fn) -> None:
    man = json.loads((path / MANIFEST).read_text())
    fn(man["hydraopt"])
    (path / MANIFEST).write_text(json.dumps(man))


def test_bundle_corruption_is_caught(lib4, tmp_path):
    bank = AdapterBank.load(lib4)
    path = fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=2)).save(tmp_path / "b")
    good = (path / MANIFEST).read_text()
    raw = (path / FACTORS).read_bytes()
    (path / FACTORS).write_bytes(raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:])
    with pytest.raises(AdapterError, match="does not match its sha256"):
        HydraBundle.load(path)
    (path / FACTORS).write_bytes(raw)
    m0 = bank.modules[0]
    _edit_section(path, lambda h: h["modules"][m0]["a_group"].__setitem__(0, 5))
    with pytest.raises(AdapterError, match="task map is not 4 indices"):
        HydraBundle.load(path)
    (path / MANIFEST).write_text(good)
    _edit_section(path, lambda h: h["modules"][m0].__setitem__("rank", 3))
    with pytest.raises(AdapterError, match=r"::A is F32 \(1, 4, 64\), .* says F32 \(1, 3, 64\)"):
        HydraBundle.load(path)  # caught from the header, before the factors are read
    (path / MANIFEST).write_text(good)
    _edit_section(path, lambda h: h["tasks"].__setitem__(0, "../escape"))
    with pytest.raises(AdapterError, match="is not a plain folder name"):
        HydraBundle.load(path)
    (path / MANIFEST).write_text(good)
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="not listed in romscale_manifest.json"):
        HydraBundle.load(path)
    (path / "extra.bin").unlink()
    (path / MANIFEST).write_text("{")
    with pytest.raises(AdapterError, match="not valid JSON"):
        HydraBundle.load(path)
    (path / MANIFEST).unlink()
    with pytest.raises(AdapterError, match="romscale_manifest.json is missing"):
        HydraBundle.load(path)
    with pytest.raises(AdapterError, match="no task 'zzz'"):
        fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1)).task_adapter("zzz")


def test_storage_fraction_means_bytes(lib4, lib_fp16_ties):
    """fp16 in -> fp16 factors out, and a storage fraction is a fraction of the library's bytes."""
    fp16 = AdapterBank.load(lib_fp16_ties)
    b = fit_hydraopt(fp16, HydraOptConfig(storage=0.5))
    st = b.storage()
    assert {f.A.dtype for f in b.modules.values()} == {torch.float16} and st.bytes == 2 * st.params
    assert st.bytes <= 0.5 * fp16.storage().bytes and b.summary()["storage"]["dtype"] == "float16"
    fp32 = AdapterBank.load(lib4)
    lib = fp32.storage()
    assert {f.A.dtype for f in fit_hydraopt(fp32, HydraOptConfig(k_a=1, k_b=1)).modules.values()} == {torch.float32}
    # fp16 factors of an fp32 library: 0.3 of the bytes allows up to 0.6 of the parameters ...
    half = fit_hydraopt(fp32, HydraOptConfig(storage=0.3, factor_dtype="float16"))
    s = half.summary()
    assert s["storage"]["bytes"] <= 0.3 * lib.bytes and s["storage_fraction_params"] > 0.3
    assert s["storage_fraction_bytes"] == pytest.approx(s["storage_fraction_params"] / 2)
    assert half.fit["chosen"]["storage_fraction_bytes"] == pytest.approx(s["storage_fraction_bytes"])
    # ... while storage_unit="params" keeps the old meaning.
    by_params = fit_hydraopt(fp32, HydraOptConfig(storage=0.3, factor_dtype="float16", storage_unit="params"))
    assert by_params.storage().params <= 0.3 * lib.params
    assert all({"bytes", "dtype", "storage_fraction_params", "storage_fraction_bytes"} <= set(c) for c in half.fit["candidates"])


def test_bad_hydraopt_arguments(lib4):
    bank = AdapterBank.load(lib4)
    with pytest.raises(RomscaleError, match=r"storage target 0.05 \(of the library's bytes\) is below the smallest HydraOpt configuration"):
        fit_hydraopt(bank, HydraOptConfig(storage=0.05))
    for bad in (0.0, 1.5):
        with pytest.raises(RomscaleError, match=r"fraction in \(0, 1\]"):
            fit_hydraopt(bank, HydraOptConfig(storage=bad))
    with pytest.raises(RomscaleError, match="factor_dtype must be one of"):
        fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1, factor_dtype="float64"))
    with pytest.raises(RomscaleError, match=r"K_A and K_B must be in \[1, 4\]"):
        fit_hydraopt(bank, HydraOptConfig(k_a=5, k_b=1))
    with pytest.raises(RomscaleError, match="task weights"):
        fit_hydraopt(bank, HydraOptConfig(k_a=1, k_b=1, task_weights=[1, 2]))


def test_many_targets_equal_separate_runs(lib6):
    from romscale.adapters.hydraopt import fit_hydraopt_many

    bank = AdapterBank.load(lib6)
    fs = [0.3, 0.55, 0.8]
    for f, b in zip(fs, fit_hydraopt_many(bank, HydraOptConfig(), fs)):
        one = fit_hydraopt(bank, HydraOptConfig(storage=f))
        assert b.fit["chosen"] == one.fit["chosen"]
        assert b.fit["objective"] == pytest.approx(one.fit["objective"], rel=1e-12, abs=1e-15)


def test_auto_structure_shares_the_similar_side():
    shared_B = synthetic_bank(lambda t, m: _rand(10 * t + _seed(m), 4, SHAPES[m][1]), lambda t, m: _rand(_seed(m), SHAPES[m][0], 4), n=4)
    f = storage_params(shared_B, 4, 1) / shared_B.storage().params
    b = fit_hydraopt(shared_B, HydraOptConfig(storage=f + 1e-9))
    assert b.fit["structure_choice"]["searched"] == ["b"] and b.fit["objective"] < 1e-10
    shared_A = synthetic_bank(lambda t, m: _rand(_seed(m), 4, SHAPES[m][1]), lambda t, m: _rand(10 * t + _seed(m), SHAPES[m][0], 4), n=4)
    f = storage_params(shared_A, 1, 4) / shared_A.storage().params
    a = fit_hydraopt(shared_A, HydraOptConfig(storage=f + 1e-9))
    assert a.fit["structure_choice"]["searched"] == ["a"] and a.fit["objective"] < 1e-10
    both = fit_hydraopt(shared_A, HydraOptConfig(storage=f + 1e-9, structures=("a", "b")))
    assert {c["tree"] for c in both.fit["candidates"]} == {"a", "b"} and both.fit["objective"] < 1e-10
