"""The demo job on the tiny preset with a synthetic corpus (no download): its plot, results.json and
table figures are one evaluation, and its folder is a complete romscale output."""

import json
import random

import pytest

import romscale.pipeline as pipeline
from romscale.meki.attach import meki_state
from romscale.meki.io import load_meki
from romscale.train.data import train_tokenizer
from romscale.utils.outputs import MANIFEST, OutputError, output_kind, read_manifest

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous fortune".split()


@pytest.fixture
def tiny_demo(monkeypatch):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(400)) + "\n" for _ in range(6)]
    tok = train_tokenizer(texts, 300)
    monkeypatch.setattr(pipeline, "fetch_shakespeare", lambda: [])
    monkeypatch.setattr(pipeline, "read_texts", lambda files: texts)
    monkeypatch.setattr(pipeline, "shakespeare_tokenizer", lambda texts, vocab: tok)
    plotted = []
    real_plot = pipeline._plot
    monkeypatch.setattr(pipeline, "_plot", lambda curves, label: plotted.append(curves) or real_plot(curves, label))
    return plotted


def _cfg(out, **kw):
    kw.setdefault("adapters", False)  # the adapter part needs the packaged SmolLM2: tested on its own below
    kw.setdefault("llamacpp", False)  # so does the llama.cpp comparison: tested on its own below
    return pipeline.DemoConfig(
        out=out, preset="tiny", steps=4, eval_every=2, batch_size=4, block_size=16, vocab_size=300, new_tokens=4, val_blocks=5, **kw
    )


def test_demo_adapter_part_on_a_tiny_model(tmp_path, monkeypatch, tiny_llama):
    """The main job's adapter benchmark, on a tiny random Llama and a synthetic 4-task bank (the real
    one builds the packaged tasks): every planned point is scored, results land in the folder."""
    from conftest import hf_tokenizer

    from romscale.data.taskbank import Example, write_task_bank

    def fake_bank(names, out, **_):
        rows = lambda p, n, s, up: [Example(f"{p}{k}", f"w{k % 5} x{k}", f"W{k % 5}" if up else f"w{k % 5}") for k in range(s, s + n)]
        tasks = [({"name": n, "family": n.split("-")[0], "language": "en", "metric": "exact_match", "template": "{input}",
                   "labels": None, "max_new_tokens": 3, "sizes": {}, "source": "synthetic", "license": "CC0"},
                  {"train": rows(n[:3], 6, 0, i % 2), "val": rows(n[:3], 4, 50, i % 2), "test": rows(n[:3], 3, 80, i % 2)})
                 for i, n in enumerate(names)]
        return write_task_bank(tasks, out)

    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)
    hf_tokenizer().save_pretrained(base)
    monkeypatch.setattr("romscale.data.tasksources.build_task_bank", fake_bank)
    cfg = pipeline.DemoConfig(out=tmp_path / "unused", adapter_base=str(base), adapter_steps=2, adapter_examples=3)
    r = pipeline.run_adapter_demo(cfg, tmp_path / "adapters", log=lambda *_: None)
    methods = {row["method"] for row in r["summary"]}
    assert {"zero_shot", "individual", "merge/ties", "hydraopt", "cluster/d2c-moved", "cluster/random",
            "cluster/kmeans_svd", "cluster/oracle_family"} == methods
    assert {p.name for p in (tmp_path / "adapters").iterdir()} >= {"bank", "work", "results.json", "results.md", "results.png"}
    fam = json.loads((tmp_path / "adapters" / "work" / "points" / "cluster-oracle_family_k2_s0.json").read_text())
    assert fam["partition"] == {"topic-bbc-en": 0, "topic-reuters-en": 0, "topic-newsgroups-en": 0, "summarisation-bbc-en": 1}


def test_demo_plots_and_reports_one_validation_figure(tmp_path, tiny_demo):
    out = tmp_path / "demo"
    r = pipeline.run_demo(_cfg(out), log=lambda *_: None)
    on_disk = json.loads((out / "results.json").read_text())
    (curves,) = tiny_demo
    for arm, key in (("dense", "dense"), ("meki", "meki_run")):
        curve = on_disk[key]["val_curve"]
        assert [step for step, _ in curve] == [2, 4]  # every eval_every steps, the last at the final step
        assert curves[arm] == curve  # results.json holds exactly what was plotted
        assert on_disk[key]["val_loss"] == curve[-1][1]  # the table's figure is the curve's last point
    assert on_disk["validation"]["blocks"] == 5 and on_disk["validation"]["of_blocks"] > 5
    assert abs(on_disk["fold_check"]["val_loss_diff"]) < 1e-4  # the folded model scores the same
    assert r["dense"]["val_loss"] == on_disk["dense"]["val_loss"]
    native = on_disk["native_runtime"]  # the native runtime's decode speeds, measured in paired rounds
    assert set(native["tok_s_mean"]) == {"ort dense", "ort MeKi", "hf eager"} and min(native["tok_s_mean"].values()) > 0
    assert native["ratios"]["ort MeKi / ort dense"]["n"] == native["rounds"]
    # A complete romscale output, with the folded model a loadable checkpoint of its own.
    assert output_kind(out) == pipeline.OUTPUT_KIND
    files = read_manifest(out, pipeline.OUTPUT_KIND, OutputError)["files"]
    assert {"results.json", "loss.png", f"{pipeline.FOLDED_DIR}/model.safetensors", f"{pipeline.FOLDED_DIR}/{MANIFEST}"} <= set(files)
    assert meki_state(load_meki(out / pipeline.FOLDED_DIR)).folded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary or lock files left


def test_demo_refuses_to_replace_before_training(tmp_path, tiny_demo, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "train_lm", lambda *a, **k: calls.append(a))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not romscale's")
    with pytest.raises(OutputError, match="not a romscale output"):
        pipeline.run_demo(_cfg(foreign, overwrite=True), log=lambda *_: None)
    assert (foreign / "notes.txt").read_text() == "not romscale's" and not calls


def test_demo_overwrites_its_own_output_only_when_asked(tmp_path, tiny_demo):
    out = tmp_path / "demo"
    first = pipeline.run_demo(_cfg(out), log=lambda *_: None)
    with pytest.raises(OutputError, match="already exists"):
        pipeline.run_demo(_cfg(out), log=lambda *_: None)
    second = pipeline.run_demo(_cfg(out, overwrite=True, seed=1), log=lambda *_: None)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["seed"] == 1 and on_disk["dense"]["val_loss"] == second["dense"]["val_loss"] != first["dense"]["val_loss"]


def test_demo_llamacpp_part_is_skipped_with_its_reason_or_runs_the_dense_comparison(monkeypatch):
    import romscale.bench.native as native
    import romscale.rom.llamacpp as llamacpp

    cfg = pipeline.DemoConfig(llamacpp_rounds=3)
    lines = []

    def missing():
        raise llamacpp.LlamaCppMissingError("the llama.cpp benchmark anchor needs the optional llama-cpp-python package")

    monkeypatch.setattr(llamacpp, "_llama_cpp", missing)
    r = pipeline.run_llamacpp_demo(cfg, lines.append)
    assert "llama-cpp-python" in r["skipped"] and "skipped" in lines[-1]
    seen = []
    monkeypatch.setattr(llamacpp, "_llama_cpp", lambda: object())
    monkeypatch.setattr(native, "bench_native", lambda c, work, log: seen.append(c) or {"arms": {}, "paths": {"dense": str(work)}})
    r = pipeline.run_llamacpp_demo(cfg, lines.append)
    (c,) = seen
    assert not c.meki and c.llamacpp and not c.hf_eager and c.weights == "fp32" and c.rounds == 3
    assert c.model == cfg.adapter_base and "paths" not in r and r["seconds"] >= 0
