"""`romscale adapters train` and `romscale eval tasks` on a tiny random Llama and a tiny task bank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QKVO, assert_usage_error, hf_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model

from romscale.adapters.bank import AdapterBank
from romscale.adapters.library import load_library
from romscale.adapters.peft_io import read_peft_adapter
from romscale.data.taskbank import Example, write_task_bank
from romscale.errors import AdapterError

WORDS = "the cat sat on a mat and then ran off to see her old friend".split()
TRAIN = ["--rank", "4", "--alpha", "8", "--steps", "6", "--lr", "0.01", "--batch-size", "4", "--max-len", "48"]


def _split(prefix, n, start, labels=None):
    rows = []
    for k in range(start, start + n):
        text = " ".join(WORDS[(k * 5 + j) % len(WORDS)] for j in range(1 + k % 4))
        rows.append(Example(f"{prefix}{k}", f"{text} {k}", labels[k % 2] if labels else text.upper()))
    return rows


def _spec(name, metric, labels=None):
    return {"name": name, "family": name.split("-")[0], "language": "en", "metric": metric, "template": "Do it.\n{input}",
            "labels": labels, "max_new_tokens": 4, "sizes": {}, "source": "synthetic", "license": "CC0"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("train")
    lab = ["yes", "no"]
    tasks = [(_spec(n, m, lb), {"train": _split(n[0], 8, 0, lb), "val": _split(n[0], 3, 50, lb), "test": _split(n[0], 4, 80, lb)})
             for n, m, lb in (("upper-en", "exact_match", None), ("yes-en", "accuracy", lab), ("caps-en", "exact_match", None))]
    bank = write_task_bank(tasks, root / "bank")
    base = root / "base"
    tiny_llama(0).save_pretrained(base)
    hf_tokenizer().save_pretrained(base)
    return root, bank, base


@pytest.fixture(scope="module")
def lib(setup):
    """A library trained once through the CLI (in-process)."""
    from romscale.cli import app
    from romscale.cli_common import main

    root, bank, base = setup
    main(app, ["adapters", "train", "--bank", str(bank), "--base", str(base), "--out", str(root / "lib"), *TRAIN,
               "--json", str(root / "train.json")])
    return root / "lib"


def _hash_A(folder: Path) -> dict[str, torch.Tensor]:
    a = read_peft_adapter(folder)
    return {m: lm.A for m, lm in a.modules.items()}


def test_library_layout_and_loading(setup, lib, tiny_llama, tree_hash):
    root, bank, base = setup
    names = ["upper-en", "yes-en", "caps-en"]
    manifest = json.loads((lib / "romscale_manifest.json").read_text())
    assert manifest["kind"] == "adapter-library" and list(manifest["files"]) == ["library.json"]
    runs = json.loads((lib / "runs.json").read_text())
    assert runs["romscale_output"] == "adapter-runs" and runs["order"] == names
    for t in names:
        r = runs["runs"][t]
        assert r["steps"] == 6 and r["seconds"] > 0 and r["seed"] == 0 and r["config"]["rank"] == 4
        assert r["final_loss"] < r["first_loss"]  # it learns (loss on target tokens only)
        assert json.loads((lib / t / "romscale_manifest.json").read_text())["kind"] == "peft-adapter"
    report = json.loads((root / "train.json").read_text())
    assert report["trained"] == names and report["skipped"] == []
    bank_ = load_library(lib)
    assert isinstance(bank_, AdapterBank) and bank_.names == names
    assert load_library(lib, ["caps-en", "upper-en"]).names == ["caps-en", "upper-en"]
    assert AdapterBank.load([lib / t for t in names]).n == 3
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    pm = PeftModel.from_pretrained(tiny_llama(0), str(lib / "yes-en")).eval()
    from romscale.eval.slot import AdapterSlot

    slot = AdapterSlot(tiny_llama(0), rank=4)
    slot.set(bank_.adapters[1])
    with torch.no_grad():
        torch.testing.assert_close(slot.peft_model(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="no finished adapter"):
        load_library(lib, ["nope"])


def test_same_seed_same_lora_A_init(setup, tmp_path, cli, tiny_llama):
    root, bank, base = setup
    # lr 1e-12: one AdamW step moves A by ~1e-12, so the trained A equal the shared initialisation
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", tmp_path / "l0", "--rank", "4", "--alpha", "8",
            "--steps", "1", "--lr", "1e-12", "--batch-size", "2", "--max-len", "32")
    assert r.exit_code == 0, r
    As = [_hash_A(tmp_path / "l0" / t) for t in ("upper-en", "yes-en", "caps-en")]
    model = tiny_llama(0)
    torch.manual_seed(0)  # PEFT's own init under the same seed
    ref = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(QKVO), task_type="CAUSAL_LM"))
    ref_A = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p for n, p in ref.named_parameters()
             if "lora_A" in n}
    assert set(ref_A) == set(As[0])
    for A in As:
        for m in A:
            torch.testing.assert_close(A[m], ref_A[m].detach(), rtol=0, atol=1e-9)
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", tmp_path / "l1", "--rank", "4", "--alpha", "8",
            "--steps", "1", "--lr", "1e-12", "--batch-size", "2", "--max-len", "32", "--seed", "1", "--tasks", "yes-en")
    assert r.exit_code == 0, r
    other = _hash_A(tmp_path / "l1" / "yes-en")
    assert not torch.allclose(other["model.layers.0.self_attn.q_proj"], As[0]["model.layers.0.self_attn.q_proj"])


def test_resume_skips_finished_and_restarts_interrupted(setup, lib, tmp_path, cli, tree_hash):
    root, bank, base = setup
    work = tmp_path / "lib"
    shutil.copytree(lib, work)
    before = tree_hash(work / "upper-en")
    shutil.rmtree(work / "yes-en")
    debris = work / ".yes-en.romscale-tmp-killed"  # what a writer killed mid-write leaves
    debris.mkdir()
    (debris / "adapter_model.safetensors").write_bytes(b"half")
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", work, *TRAIN)
    assert r.exit_code == 0, r
    assert "2 finished task(s) skipped, 1 to train" in " ".join(r.output.split())
    assert not debris.exists() and tree_hash(work / "upper-en") == before
    same = {k: v for k, v in tree_hash(work / "yes-en").items() if k != "romscale_manifest.json"}  # (seconds differ)
    assert same == {k: v for k, v in tree_hash(lib / "yes-en").items() if k != "romscale_manifest.json"}  # deterministic
    assert json.loads((work / "runs.json").read_text())["order"] == ["upper-en", "yes-en", "caps-en"]
    # other settings: refused, naming what differs; --overwrite starts again
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", work, *TRAIN[:-2], "--max-len", "40")
    assert_usage_error(r, "other settings", "max_len")
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", work, *TRAIN, "--tasks", "caps-en", "--overwrite")
    assert r.exit_code == 0, r
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == \
        ["caps-en", "library.json", "romscale_manifest.json", "runs.json"]
    # a foreign file in the library: refused
    (work / "notes.txt").write_text("mine")
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", work, *TRAIN)
    assert_usage_error(r, "notes.txt", "did not write")


def test_train_bad_inputs(setup, lib, tmp_path, cli):
    root, bank, base = setup
    ok = ["--bank", bank, "--base", base, "--out", tmp_path / "new"]
    assert_usage_error(cli("adapters", "train", "--bank", tmp_path / "nope", "--base", base, "--out", tmp_path / "o"), "--bank", "does not exist")
    assert_usage_error(cli("adapters", "train", "--bank", bank, "--base", tmp_path / "nope", "--out", tmp_path / "o"), "--base", "does not exist")
    assert_usage_error(cli("adapters", "train", *ok, "--tasks", "nope"), "unknown task or subset 'nope'")
    assert_usage_error(cli("adapters", "train", *ok, "--rank", "0"), "--rank")
    assert_usage_error(cli("adapters", "train", *ok, "--lr", "0"), "--lr")
    assert_usage_error(cli("adapters", "train", *ok, "--device", "tpu"), "--device")
    if not torch.cuda.is_available():
        assert_usage_error(cli("adapters", "train", *ok, "--device", "cuda"), "--device cuda", "no CUDA device")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    assert_usage_error(cli("adapters", "train", "--bank", bank, "--base", base, "--out", mine), "--out", "not a romscale output")
    assert_usage_error(cli("adapters", "train", "--bank", bank, "--base", base, "--out", bank / "lib"), "--out", "input")
    assert_usage_error(cli("adapters", "train", *ok, "--json", tmp_path / "new" / "r.json"), "--json", "inside the output")
    assert not (tmp_path / "new").exists()
    not_a_bank = tmp_path / "nb"
    not_a_bank.mkdir()
    assert_usage_error(cli("adapters", "train", "--bank", not_a_bank, "--base", base, "--out", tmp_path / "o2"), "task-bank")


def test_eval_tasks_zero_shot_and_individual(setup, lib, tmp_path, cli):
    root, bank, base = setup
    out = tmp_path / "eval.json"
    r = cli("eval", "tasks", "--bank", bank, "--base", base, "--adapters", lib, "--zero-shot", "--limit", "3",
            "--loss-examples", "2", "--batch-size", "2", "--json", out)
    assert r.exit_code == 0, r
    doc = json.loads(out.read_text())
    assert doc["romscale_output"] == "eval-tasks" and list(doc["methods"]) == ["zero-shot", "individual"]
    for m in ("zero-shot", "individual"):
        rows = doc["methods"][m]["tasks"]
        assert list(rows) == ["upper-en", "yes-en", "caps-en"]
        for row in rows.values():
            assert row["n"] == 3 and 0 <= row["score"] <= 100 and row["loss_n"] == 2 and row["loss"] > 0
            assert len(row["predictions"]) == 3
    # the slot gives each task its own adapter: the loss differs from zero-shot, and equals a fresh evaluation
    z, i = doc["methods"]["zero-shot"]["tasks"], doc["methods"]["individual"]["tasks"]
    assert all(z[t]["loss"] != i[t]["loss"] for t in z)
    assert doc["methods"]["individual"]["tasks"]["yes-en"]["adapter"].endswith("yes-en")
    out2 = tmp_path / "one.json"
    r = cli("eval", "tasks", "--bank", bank, "--base", base, "--adapter", f"yes-en={lib / 'yes-en'}", "--tasks", "yes-en",
            "--limit", "3", "--loss-examples", "2", "--json", out2)
    assert r.exit_code == 0, r
    one = json.loads(out2.read_text())["methods"]["individual"]["tasks"]["yes-en"]
    assert one["loss"] == pytest.approx(i["yes-en"]["loss"], rel=1e-5) and one["predictions"] == i["yes-en"]["predictions"]
    assert "yes-en" in r.stdout and "mean" in r.stdout


def test_eval_bad_inputs(setup, lib, tmp_path, cli, make_lora):
    root, bank, base = setup
    j = ["--json", tmp_path / "e.json"]
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, *j), "nothing to evaluate")
    assert_usage_error(cli("eval", "tasks", "--bank", tmp_path / "no", "--base", base, "--zero-shot", *j), "--bank")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--zero-shot", "--split", "dev", *j), "--split")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--zero-shot", "--tasks", "nope", *j), "nope")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--adapter", "yes-en", *j), "TASK=DIR")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--adapter", f"nope={lib / 'yes-en'}", *j), "'nope'")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--adapters", bank, *j), "adapter-library")
    partial = tmp_path / "partial"
    r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", partial, *TRAIN[:6], "--steps", "1", "--batch-size", "2",
            "--tasks", "caps-en")
    assert r.exit_code == 0, r
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--adapters", partial, *j), "no finished adapter", "upper-en")
    wide = make_lora(tmp_path / "wide", seed=3, hidden=32)  # another base model's shapes
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--adapter", f"yes-en={wide}", "--tasks", "yes-en", *j),
                       "another base model")
    (tmp_path / "e.json").write_text("{}")
    assert_usage_error(cli("eval", "tasks", "--bank", bank, "--base", base, "--zero-shot", *j), "--json", "not written by romscale")


def test_packaged_model_is_converted_once(setup, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from conftest import tiny_base, write_tiny_gguf

    from romscale.data import packages
    from romscale.errors import ModelInputError
    from romscale.models import (
        PACKAGED_MODELS,
        load_causal_lm,
        packaged_model,
        resolve_base,
    )
    from romscale.utils.outputs import OutputError, output_kind

    assert "smollm2-135m-instruct" in PACKAGED_MODELS
    with pytest.raises(ModelInputError, match="not a packaged model"):
        packaged_model("gpt-17")
    assert resolve_base(setup[2]) == setup[2].resolve()
    # the wheel's GGUF stands in for a tiny one: no registry in tests
    gguf_file = tmp_path / "tiny.gguf"
    ref = tiny_base("llama", 3, tie=False)
    write_tiny_gguf(ref, gguf_file, quantized=True)
    calls = []
    monkeypatch.setattr(packages, "fetch_pip", lambda spec: calls.append(spec) or tmp_path / "x.whl")
    monkeypatch.setattr(packages, "cached_zip_member", lambda whl, member, name: gguf_file)
    monkeypatch.setenv("ROMSCALE_CACHE", str(tmp_path / "cache"))
    folder = packaged_model("smollm2-135m-instruct")
    assert output_kind(folder) == "packaged-model" and (folder / "model.safetensors").is_file()
    model, tok = load_causal_lm(folder)
    gmodel, _ = load_causal_lm(gguf_file)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gmodel(input_ids=ids).logits)
    assert tok is not None and "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert packaged_model("smollm2-135m-instruct") == folder and len(calls) == 1  # converted once
    # a cache folder romscale did not write is never replaced
    monkeypatch.setenv("ROMSCALE_CACHE", str(tmp_path / "other"))
    mine = tmp_path / "other" / "models" / "smollm2-135m-instruct"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a romscale output"):
        packaged_model("smollm2-135m-instruct")
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_retraining_gives_the_same_adapter_bytes(setup, tmp_path, cli, device):
    """The premise of `adapters benchmark --reuse`: the same seed, machine and packages retrain the
    same adapters, to the byte (on CUDA through romscale.adapters.train.reproducible)."""
    root, bank, base = setup
    for out in ("a", "b"):
        r = cli("adapters", "train", "--bank", bank, "--base", base, "--out", tmp_path / out, *TRAIN, "--tasks", "yes-en",
                "--device", device)
        assert r.exit_code == 0, r
    a, b = (tmp_path / out / "yes-en" / "adapter_model.safetensors" for out in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    w = read_peft_adapter(tmp_path / "a" / "yes-en").modules["model.layers.0.self_attn.q_proj"].B
    assert w.abs().max() > 0  # trained: B moved off its zero initialisation
