"""Reconstruction report and the `romscale adapters` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapters_helpers import lib4, make_lora, tiny_llama, tok_ids, tree_hash  # noqa: F401 (fixtures)
from peft import PeftModel
from typer.testing import CliRunner

from romscale.adapters.bank import AdapterBank
from romscale.adapters.cli import app
from romscale.adapters.merge import MergeOptions, merge_adapters
from romscale.adapters.report import merged_task_errors, reconstruction_report

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _text(res) -> str:
    return " ".join(res.output.split())


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


def test_cli_end_to_end_and_inputs_untouched(lib4, tmp_path, tok_ids):
    before = {p: tree_hash(p) for p in lib4}
    r = _run("info", *lib4, "--json", tmp_path / "info.json")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["library_storage"]["params"] == AdapterBank.load(lib4).storage().params
    assert "library" in r.output

    r = _run("merge", *lib4, "--method", "ties", "--density", "0.4", "--out", tmp_path / "merged", "--json", tmp_path / "merge.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "merge.json").read_text())
    assert summary["family"] == "update" and summary["peft_equivalent"] == "ties_svd"
    PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "merged"))

    r = _run("hydraopt", *lib4, "--storage", "0.6", "--out", tmp_path / "bundle", "--export-dir", tmp_path / "tasks", "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r.output
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["storage_fraction_params"] <= 0.6 and set(h["task_errors"]) == {p.name for p in lib4}
    for p in lib4:
        pm = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "tasks" / p.name))
        with torch.no_grad():
            pm(input_ids=tok_ids)

    r = _run("info", tmp_path / "bundle")
    assert r.exit_code == 0 and "HydraOpt bundle" in r.output
    r = _run("export", tmp_path / "bundle", lib4[1].name, tmp_path / "one")
    assert r.exit_code == 0, r.output
    r = _run("hydraopt", *lib4, "--k-a", "1", "--k-b", "4", "--out", tmp_path / "b2")
    assert r.exit_code == 0, r.output

    r = _run("report", *lib4, "--methods", "task_arithmetic,ties_ab", "--budgets", "0.5", "--json", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert {row["method"] for row in rep["rows"]} == {"task_arithmetic", "ties_ab", "hydraopt"}

    r = _run("methods")
    assert r.exit_code == 0 and "dare_ties_ab" in r.output
    assert {p: tree_hash(p) for p in lib4} == before


def test_cli_errors_are_clear(lib4, tmp_path):
    other = make_lora(tmp_path / "qv", 1, targets=("q_proj", "v_proj"))
    r = _run("merge", lib4[0], other, "--method", "ties", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "adapted modules differ" in _text(r)
    r = _run("merge", *lib4, "--method", "nope", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "unknown merge method" in _text(r)
    r = _run("merge", *lib4, "--method", "ties", "--out", lib4[0], "--overwrite")
    assert r.exit_code == 2 and "inputs are never overwritten" in _text(r)
    r = _run("hydraopt", *lib4, "--storage", "0.01", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "below the smallest" in _text(r)
    r = _run("info", tmp_path / "missing")
    assert r.exit_code == 2 and "does not exist" in _text(r)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_cli_data_aware_hydraopt(lib4, tmp_path, tok_ids):
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    ex = {p.name: [tok_ids[0].tolist(), tok_ids[1].tolist()] for p in lib4[:3]}  # one task without examples
    (tmp_path / "ex.json").write_text(json.dumps(ex))
    r = _run("hydraopt", *lib4, "--storage", "0.5", "--examples", tmp_path / "ex.json", "--base-model", base,
             "--data-weight", "0.7", "--out", tmp_path / "b", "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r.output
    fit = json.loads((tmp_path / "h.json").read_text())["fit"]
    assert fit["config"]["data_weight"] == 0.7 and set(fit["task_errors_data"]) == {p.name for p in lib4}
    r = _run("hydraopt", *lib4, "--examples", tmp_path / "ex.json", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--examples needs --base-model" in _text(r)
