"""Reconstruction report and the `romscale adapters` commands: grammar, error contract (one `error:`
line, exit 2, options checked before anything is loaded), safe outputs, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_usage_error
from peft import PeftModel

import romscale.adapters.bank as bank_module
from romscale.adapters import cli as adapters_cli
from romscale.adapters.bank import AdapterBank
from romscale.adapters.bundle import BUNDLE_KIND, SET_KIND, HydraBundle
from romscale.adapters.merge import MergeOptions, merge_adapters
from romscale.adapters.peft_io import ADAPTER_KIND, read_peft_adapter
from romscale.adapters.report import merged_task_errors, reconstruction_report
from romscale.adapters.storage import DTYPES
from romscale.utils.outputs import output_kind


def test_report_rows_and_factored_errors(lib4):
    bank = AdapterBank.load(lib4)
    rep = reconstruction_report(bank, ["task_arithmetic", "ties", "linear_ab"], [0.3, 0.5, 0.8, 1.0], merge_options=MergeOptions(density=0.5))
    rows = rep["rows"]
    assert [r["method"] for r in rows[:3]] == ["task_arithmetic", "ties", "linear_ab"]
    hyd = [r for r in rows if r["method"] == "hydraopt"]
    assert [r["target"] for r in hyd] == sorted(r["target"] for r in hyd) and hyd[0]["budget"] == "single adapter"
    rms = [r["rms_error"] for r in hyd]
    assert all(b <= a + 1e-12 for a, b in zip(rms, rms[1:]))  # never worse with more storage
    assert rms[-1] < 1e-6  # 100% storage is the library itself
    for r in rows:  # both units and the dtype, on every row
        assert r["storage_bytes"] == 4 * r["storage_params"] and r["storage_dtype"] == "float32"
        assert r["storage_fraction_bytes"] == pytest.approx(r["storage_fraction_params"])
    assert all(r["storage_fraction_bytes"] <= r["target"] + 1e-12 for r in hyd)
    # Factored-form errors equal dense ones.
    res = merge_adapters(bank, "ties", MergeOptions(density=0.5))
    got = merged_task_errors(bank, {m: (lm.A, lm.B) for m, lm in res.adapter.modules.items()})
    for t in range(bank.n):
        e = []
        for m in bank.modules:
            dW = bank.stack(m).delta(t, torch.float64)
            lm = res.adapter.modules[m]
            e.append(float((dW - lm.B.double() @ lm.A.double()).norm() / dW.norm()) ** 2)
        assert got[t] == pytest.approx(np.sqrt(np.mean(e)), rel=1e-6)
    assert rows[1]["task_errors"][bank.names[0]] == pytest.approx(got[0], rel=1e-9)


def test_report_budgets_are_fractions_of_bytes(lib_fp16_ties, lib4):
    rep = reconstruction_report(AdapterBank.load(lib_fp16_ties), ["ties"], [0.5])
    assert rep["storage_unit"] == "bytes" and rep["library_storage"]["dtype"] == "float16"
    assert {r["storage_dtype"] for r in rep["rows"]} == {"float16"}  # fp16 in, fp16 out
    from romscale.adapters.hydraopt import HydraOptConfig

    bank = AdapterBank.load(lib4)
    by_params = reconstruction_report(bank, [], [0.5], hydra_config=HydraOptConfig(storage_unit="params", factor_dtype="float16"))
    by_bytes = reconstruction_report(bank, [], [0.5], hydra_config=HydraOptConfig(factor_dtype="float16"))
    p = next(r for r in by_params["rows"] if r["target"] == 0.5)
    b = next(r for r in by_bytes["rows"] if r["target"] == 0.5)
    assert p["storage_fraction_params"] <= 0.5 and b["storage_fraction_bytes"] <= 0.5 < b["storage_fraction_params"]


def test_cli_end_to_end_and_inputs_untouched(cli, lib4, tiny_llama, tree_hash, tmp_path, tok_ids):
    before = {p: tree_hash(p) for p in lib4}
    r = cli("adapters", "info", *lib4, "--json", tmp_path / "info.json")
    assert r.exit_code == 0, r
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["library_storage"]["params"] == AdapterBank.load(lib4).storage().params and info["dtype"] == "float32"
    assert info["romscale_output"] == "adapters-info" and info["command"].startswith("romscale ")
    assert "library" in r.stdout

    r = cli("adapters", "merge", *lib4, "--method", "ties", "--density", "0.4", "--out", tmp_path / "merged", "--json", tmp_path / "merge.json")
    assert r.exit_code == 0, r
    summary = json.loads((tmp_path / "merge.json").read_text())
    assert summary["family"] == "update" and summary["peft_equivalent"] == "ties_svd"
    assert summary["storage"]["dtype"] == "float32" and summary["storage"]["bytes"] == 4 * summary["storage"]["params"]
    assert output_kind(tmp_path / "merged") == ADAPTER_KIND
    PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "merged"))

    r = cli("adapters", "hydraopt", *lib4, "--storage", "0.6", "--out", tmp_path / "bundle", "--export-dir", tmp_path / "tasks",
            "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["storage_fraction_bytes"] <= 0.6 and set(h["task_errors"]) == {p.name for p in lib4}
    assert output_kind(tmp_path / "bundle") == BUNDLE_KIND and output_kind(tmp_path / "tasks") == SET_KIND
    for p in lib4:
        pm = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "tasks" / p.name))
        with torch.no_grad():
            pm(input_ids=tok_ids)

    # info on a bundle reports what the bundle holds.
    bundle = HydraBundle.load(tmp_path / "bundle")
    s = bundle.summary()
    r = cli("adapters", "info", tmp_path / "bundle", "--json", tmp_path / "binfo.json")
    assert r.exit_code == 0 and "HydraOpt bundle" in r.stdout, r
    binfo = json.loads((tmp_path / "binfo.json").read_text())
    assert (binfo["k_a"], binfo["k_b"], binfo["storage"]) == (s["k_a"], s["k_b"], s["storage"])
    assert f"{s['storage']['params']:,}" in r.stdout and f"{s['storage_fraction_bytes']:.3f}" in r.stdout
    # extract writes the task's shared factors as a PEFT adapter.
    task = lib4[1].name
    r = cli("adapters", "extract", tmp_path / "bundle", "--task", task, "--out", tmp_path / "one")
    assert r.exit_code == 0, r
    one = read_peft_adapter(tmp_path / "one")
    for m, (A, B) in bundle.task_factors(task).items():
        assert torch.equal(one.modules[m].A, A) and torch.equal(one.modules[m].B, B)
    r = cli("adapters", "extract", tmp_path / "bundle", "--all", "--out", tmp_path / "all")
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == sorted(bundle.tasks), r

    r = cli("adapters", "hydraopt", *lib4, "--k-a", "1", "--k-b", "4", "--out", tmp_path / "b2")
    assert r.exit_code == 0, r
    r = cli("adapters", "report", *lib4, "--methods", "task_arithmetic,ties_ab", "--budgets", "0.5", "--json", tmp_path / "rep.json")
    assert r.exit_code == 0, r
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert {row["method"] for row in rep["rows"]} == {"task_arithmetic", "ties_ab", "hydraopt"}
    r = cli("adapters", "methods")
    assert r.exit_code == 0 and "dare_ties_ab" in r.stdout
    assert {p: tree_hash(p) for p in lib4} == before


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command reads adapters before it has checked its options."""

    def refuse(*a, **k):
        raise AssertionError("adapters were loaded before the options were checked")

    monkeypatch.setattr(bank_module.AdapterBank, "load", refuse)
    monkeypatch.setattr(bank_module, "read_peft_adapter", refuse)


@pytest.mark.parametrize("args,needles", [
    (["merge", "--method", "ties", "--density", "0"], ["--density", "(0, 1]"]),
    (["merge", "--method", "ties", "--density", "1.5"], ["--density"]),
    (["merge", "--method", "tie"], ["--method", "'tie'"]),
    (["merge", "--method", "dare_ties", "--rng", "numpy"], ["--rng", "fast, torch"]),
    (["merge", "--method", "knots", "--knots-inner", "mean"], ["--knots-inner"]),
    (["merge", "--method", "ties", "--dtype", "int8"], ["--dtype", "auto, float32, float16, bfloat16"]),
    (["merge", "--method", "ties", "--rank", "0"], ["--rank", ">= 1"]),
    (["merge", "--method", "ties", "--weights", "1,2"], ["--weights", "2 values for 4 adapters"]),
    (["merge", "--method", "ties", "--weights", "1,x,2,3"], ["--weights", "comma-separated numbers"]),
    (["hydraopt", "--storage", "0"], ["--storage", "(0, 1]"]),
    (["hydraopt", "--storage", "1.2"], ["--storage"]),
    (["hydraopt", "--storage-unit", "rows"], ["--storage-unit", "bytes, params"]),
    (["hydraopt", "--k-a", "0"], ["--k-a", ">= 1"]),
    (["hydraopt", "--k-b", "0"], ["--k-b"]),
    (["hydraopt", "--k-a", "1", "--rank", "0"], ["--rank"]),
    (["hydraopt", "--rank", "4"], ["--rank", "--k-a/--k-b"]),
    (["hydraopt", "--rank-multipliers", "1,-2"], ["--rank-multipliers"]),
    (["hydraopt", "--structures", "a,c"], ["--structures", "'c'"]),
    (["hydraopt", "--grouping", "crossed"], ["--grouping"]),
    (["hydraopt", "--task-weights", "1,1,1,-1"], ["--task-weights", "non-negative"]),
    (["hydraopt", "--data-weight", "2"], ["--data-weight"]),
    (["hydraopt", "--factor-dtype", "float64"], ["--factor-dtype"]),
    (["hydraopt", "--examples", "ex.json"], ["--examples needs --base-model"]),
    (["hydraopt", "--base-model", "base"], ["--base-model is only used with --examples"]),
    (["report", "--budgets", "0.5,0"], ["--budgets", "(0, 1]"]),
    (["report", "--methods", "ties,nope"], ["--methods", "'nope'"]),
    (["report", "--storage-unit", "kb"], ["--storage-unit"]),
])
def test_bad_options_fail_before_loading(args, needles, cli, lib4, tmp_path, no_loading):
    verb, *rest = args
    out = [] if verb == "report" else ["--out", tmp_path / "out"]
    r = cli("adapters", verb, *lib4, *out, *rest)
    assert_usage_error(r, *needles)
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_outputs_fail_before_loading(cli, lib4, tmp_path, no_loading):
    assert_usage_error(cli("adapters", "info", tmp_path / "missing"), "does not exist")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", lib4[0], "--overwrite"), "is the input", "never writes")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", lib4[0] / "sub"), "lies inside the input")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", lib4[0].parent, "--overwrite"), "contains the input")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", tmp_path / "m", "--json", lib4[0] / "s.json"), "--json", "lies inside the input")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", tmp_path / "m", "--json", tmp_path / "m" / "s.json"), "--json", "inside the output folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", foreign, "--overwrite"), "--out", "not a romscale output")
    (tmp_path / "notes.json").write_text("{}")
    assert_usage_error(cli("adapters", "report", *lib4, "--json", tmp_path / "notes.json", "--overwrite"), "--json", "not written by romscale")
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--out", tmp_path / "b", "--export-dir", lib4[2] / "x"), "--export-dir", "lies inside the input")
    # The trust review's case: tasks exported to the inputs' parent would have replaced the inputs.
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--out", tmp_path / "b", "--export-dir", lib4[0].parent, "--overwrite"),
                       "--export-dir", "contains the input")
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--out", tmp_path / "b", "--export-dir", tmp_path / "b" / "t"), "overlap")
    assert_usage_error(cli("adapters", "extract", tmp_path / "nope", "--task", "a", "--out", tmp_path / "x"), "BUNDLE", "does not exist")
    assert_usage_error(cli("adapters", "extract", lib4[0], "--out", tmp_path / "x"), "exactly one of --task NAME and --all")
    assert (foreign / "keep.txt").read_text() == "mine" and not (tmp_path / "m").exists()


def test_outputs_replaced_only_when_ours_and_asked(cli, lib4, tmp_path):
    out = tmp_path / "m"
    assert cli("adapters", "merge", *lib4, "-m", "task_arithmetic", "--out", out).exit_code == 0
    first = read_peft_adapter(out).modules
    assert_usage_error(cli("adapters", "merge", *lib4, "-m", "ties", "--out", out), "already exists", "--overwrite")
    assert cli("adapters", "merge", *lib4, "-m", "ties", "--out", out, "--overwrite").exit_code == 0
    m = next(iter(first))
    assert not torch.equal(read_peft_adapter(out).modules[m].A, first[m].A)
    # A romscale output of another kind is never replaced by this one.
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--k-a", "1", "--k-b", "1", "--out", out, "--overwrite"),
                       "is a romscale peft-adapter output, not a hydraopt-bundle")


def test_library_errors_are_one_line(cli, lib4, make_lora, tmp_path):
    other = make_lora(tmp_path / "qv", 1, targets=("q_proj", "v_proj"))
    assert_usage_error(cli("adapters", "merge", lib4[0], other, "--method", "ties", "--out", tmp_path / "x"), "adapted modules differ")
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--storage", "0.01", "--out", tmp_path / "b"), "below the smallest")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((lib4[0] / "adapter_config.json").read_text())
    (legacy / "adapter_model.bin").write_bytes(b"\x80\x02not really")
    assert_usage_error(cli("adapters", "info", legacy), "never loads pickles")
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_cli_data_aware_hydraopt(cli, lib4, tiny_llama, tmp_path, tok_ids):
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    ex = {p.name: [tok_ids[0].tolist(), tok_ids[1].tolist()] for p in lib4[:3]}  # one task without examples
    (tmp_path / "ex.json").write_text(json.dumps(ex))
    r = cli("adapters", "hydraopt", *lib4, "--storage", "0.5", "--examples", tmp_path / "ex.json", "--base-model", base,
            "--data-weight", "0.7", "--out", tmp_path / "b", "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r
    fit = json.loads((tmp_path / "h.json").read_text())["fit"]
    assert fit["config"]["data_weight"] == 0.7 and set(fit["task_errors_data"]) == {p.name for p in lib4}
    # Outputs may not land in the base model or next to the examples' inputs.
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--examples", tmp_path / "ex.json", "--base-model", base, "--out", base / "b"),
                       "lies inside the input")
    # Texts need a tokenizer (the saved tiny model has none); ids outside the vocabulary are refused.
    (tmp_path / "texts.json").write_text(json.dumps({lib4[0].name: ["hello"]}))
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--examples", tmp_path / "texts.json", "--base-model", base, "--out", tmp_path / "c"),
                       "no tokenizer")
    (tmp_path / "big.json").write_text(json.dumps({lib4[0].name: [[1, 10_000]]}))
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--examples", tmp_path / "big.json", "--base-model", base, "--out", tmp_path / "c"),
                       "outside the base model's vocabulary")
    assert_usage_error(cli("adapters", "hydraopt", *lib4, "--examples", tmp_path / "ex.json", "--base-model", tmp_path / "nope", "--out", tmp_path / "c"),
                       "--base-model", "does not exist")
    assert not (tmp_path / "c").exists()


def test_examples_are_checked_before_loading(cli, lib4, tmp_path, no_loading):
    (tmp_path / "base").mkdir()
    for content, needle in (("{", "not valid JSON"), ("[]", "expected a JSON object"), ('{"a": []}', "non-empty list"),
                            ('{"a": [[1, -2]]}', "token ids")):
        (tmp_path / "ex.json").write_text(content)
        r = cli("adapters", "hydraopt", *lib4, "--examples", tmp_path / "ex.json", "--base-model", tmp_path / "base", "--out", tmp_path / "b")
        assert_usage_error(r, needle)


def test_cli_module_imports_nothing_heavy():
    code = ("import sys, romscale.adapters.cli; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers', 'safetensors', 'numpy', 'scipy', 'rich') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_cli_constants_match_the_library():
    from romscale.adapters import bundle, peft_io

    assert adapters_cli.DTYPE_CHOICES == ("auto", *DTYPES)
    assert (adapters_cli.ADAPTER_KIND, adapters_cli.BUNDLE_KIND, adapters_cli.SET_KIND) == (peft_io.ADAPTER_KIND, bundle.BUNDLE_KIND, bundle.SET_KIND)


def test_base_model_may_be_a_gguf_folder(cli, lib4, tiny_llama, tmp_path, tok_ids):
    pytest.importorskip("gguf")
    from conftest import write_tiny_gguf

    (tmp_path / "g").mkdir()
    write_tiny_gguf(tiny_llama(0), tmp_path / "g" / "base.gguf", tokenizer=False)
    ex = {p.name: [tok_ids[0].tolist()] for p in lib4}
    (tmp_path / "ex.json").write_text(json.dumps(ex))
    r = cli("adapters", "hydraopt", *lib4, "--storage", "0.5", "--examples", tmp_path / "ex.json", "--base-model", tmp_path / "g",
            "--out", tmp_path / "b", "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r
    assert json.loads((tmp_path / "h.json").read_text())["fit"]["config"]["data_weight"] > 0
