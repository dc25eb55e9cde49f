"""`romscale adapters benchmark` end to end on a tiny random Llama and a 4-task bank."""

from __future__ import annotations

import json

import pytest
from conftest import assert_usage_error, hf_tokenizer

from romscale.bench.adapters import RESULT_KIND, AdapterBenchmarkConfig, plan
from romscale.bench.adapters_cli import RESULT_KIND as CLI_RESULT_KIND
from romscale.data.taskbank import Example, write_task_bank

WORDS = "the cat sat on a mat and then ran off to see her old friend".split()


def _split(prefix, n, start, upper):
    rows = []
    for k in range(start, start + n):
        text = " ".join(WORDS[(k * 5 + j) % len(WORDS)] for j in range(1 + k % 3))
        rows.append(Example(f"{prefix}{k}", f"{text} {k}", text.upper() if upper else text))
    return rows


def _spec(name):
    family, lang = name.split("-")
    return {"name": name, "family": family, "language": lang, "metric": "exact_match", "template": "Do it.\n{input}",
            "labels": None, "max_new_tokens": 4, "sizes": {}, "source": "synthetic", "license": "CC0"}


CONFIG = """\
bank: {bank}
base: {base}
tasks: null
budgets: [2]
seeds: {{d2c: 1, random: 2}}
single_merges: [task_arithmetic, ties]
hydraopt_storage: [0.5]
train: {{rank: 4, alpha: 8, steps: 3, lr: 0.01, batch_size: 4, max_len: 40}}
d2c: {{iterations: 3, n: 2}}
limit: 3
batch_size: 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("abench")
    names = ["upper-en", "upper-de", "copy-en", "copy-de"]
    tasks = [(_spec(n), {s: _split(n[:2], size, start, n.startswith("upper")) for s, size, start in
                         (("train", 6, 0), ("val", 2, 40), ("test", 3, 80))}) for n in names]
    bank = write_task_bank(tasks, root / "bank")
    base = root / "base"
    tiny_llama(0).save_pretrained(base)
    hf_tokenizer().save_pretrained(base)
    cfg = root / "bench.yaml"
    cfg.write_text(CONFIG.format(bank=bank, base=base))
    return root, cfg, names


@pytest.fixture(scope="module")
def run(setup):
    from romscale.cli import app
    from romscale.cli_common import main

    root, cfg, _ = setup
    main(app, ["adapters", "benchmark", str(cfg), "--out", str(root / "work"), "--json", str(root / "r.json"),
               "--md", str(root / "r.md"), "--png", str(root / "r.png")])
    return json.loads((root / "r.json").read_text())


def test_result_kinds_agree():
    assert RESULT_KIND == CLI_RESULT_KIND


def test_every_point_scored_with_exact_storage(setup, run):
    root, cfg, names = setup
    ids = {p["id"] for p in run["points"]}
    expected = {p.id for p in plan(AdapterBenchmarkConfig(bank="b", budgets=(2,), seeds={"d2c": 1, "random": 2},
                                                          single_merges=("task_arithmetic", "ties"), hydraopt_storage=(0.5,)), 4)}
    assert ids == expected
    by = {p["id"]: p for p in run["points"]}
    assert by["zero_shot_s0"]["storage"]["bytes"] == 0
    assert by["individual_s0"]["storage"]["fraction_bytes"] == 1.0
    for pid, p in by.items():
        assert set(p["scores"]) == set(names) and all(0 <= s["score"] <= 100 and s["n"] == 3 for s in p["scores"].values())
        if pid.startswith("cluster-"):  # K = 2 merged rank-4 adapters of 4 equal ones: half the bytes
            assert p["storage"]["fraction_bytes"] == 0.5 and sorted(set(p["partition"].values())) == [0, 1]
        if pid.startswith("merge-"):
            assert p["storage"]["fraction_bytes"] == 0.25
    assert by["cluster-oracle_family_k2_s0"]["partition"] == {"upper-en": 0, "upper-de": 0, "copy-en": 1, "copy-de": 1}
    assert by["cluster-oracle_language_k2_s0"]["partition"] == {"upper-en": 0, "upper-de": 1, "copy-en": 0, "copy-de": 1}
    assert by["hydraopt_f0.5_s0"]["storage"]["fraction_bytes"] <= 0.5
    assert by["d2c_hydraopt_k2_s0"]["storage"]["bytes"] == by["cluster-d2c-moved_k2_s0"]["storage"]["bytes"]
    d2c = by["cluster-d2c-total_k2_s0"]["clustering"]
    assert d2c["counts"]["loss_evals"] >= 1 and d2c["iterations_done"] == 3 and "timings_s" in d2c
    # the individual LoRAs point is the mean of each task scored with its own adapter
    ind = by["individual_s0"]
    assert ind["mean_score"] == pytest.approx(sum(s["score"] for s in ind["scores"].values()) / 4)


def test_summary_table_plot_and_targets(setup, run):
    root, _, _ = setup
    rows = {(r["method"], r["k"]) for r in run["summary"]}
    assert ("cluster/random", 2) in rows and ("individual", None) in rows
    rnd = next(r for r in run["summary"] if r["method"] == "cluster/random")
    assert rnd["seeds"] == 2
    md = (root / "r.md").read_text()
    assert md.startswith("<!-- romscale_output: ") and "| random | 2 | 50.0 |" in md
    assert (root / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"d2c_vs_kmeans_svd", "hydraopt_half", "hydraopt_single_vs_merges"} <= set(run["targets"])


def test_resume_reuses_points_and_adapters(setup, run, cli):
    root, cfg, _ = setup
    work = root / "work"
    before = {f.name: f.read_bytes() for f in (work / "points").glob("*.json")}
    adapters = {f: f.stat().st_mtime_ns for f in (work / "lib").rglob("*.safetensors")}
    r = cli("adapters", "benchmark", str(cfg), "--out", str(work))
    assert r.exit_code == 0, r
    assert {f.name: f.read_bytes() for f in (work / "points").glob("*.json")} == before
    assert {f: f.stat().st_mtime_ns for f in (work / "lib").rglob("*.safetensors")} == adapters


def test_bad_configs_are_one_error_line(setup, cli, tmp_path):
    root, cfg, _ = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text() + "colour: blue\n")
    assert_usage_error(cli("adapters", "benchmark", str(bad), "--out", str(tmp_path / "w")), "colour")
    bad.write_text(cfg.read_text().replace("budgets: [2]", "budgets: [0]"))
    assert_usage_error(cli("adapters", "benchmark", str(bad), "--out", str(tmp_path / "w")), "budgets")
    bad.write_text(cfg.read_text().replace("budgets: [2]", "budgets: [9]"))
    assert_usage_error(cli("adapters", "benchmark", str(bad), "--out", str(tmp_path / "w")), "K=9")
    assert_usage_error(cli("adapters", "benchmark", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "w")), "none.yaml")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "mine")), "not a romscale output")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_shard_points_cover_the_plan_once_and_keep_d2c_hydraopt_with_its_search():
    from romscale.bench.adapters import shard_points

    pts = plan(AdapterBenchmarkConfig(bank="b", budgets=(2, 3), seeds={"d2c": 2, "random": 2}), 6)
    shards = [shard_points(pts, i, 3) for i in range(3)]
    ids = [p.id for s in shards for p in s]
    assert sorted(ids) == sorted(p.id for p in pts) and len(ids) == len(set(ids))
    for s in shards:
        mine = {p.id for p in s}
        for p in s:
            if p.method == "d2c_hydraopt":
                assert f"cluster-d2c-moved_k{p.k}_s{p.seed}" in mine


def test_shard_points_spread_only_the_points_left_to_compute():
    """With points reused from an earlier run, the rest is dealt round robin (not the whole plan:
    one shard would get most of the work left); the reused ones stay with shard 0, which copies them."""
    from romscale.bench.adapters import shard_points

    pts = plan(AdapterBenchmarkConfig(bank="b", budgets=(2, 3), seeds={"d2c": 2, "random": 2}), 6)
    skip = frozenset(p.id for j, p in enumerate(pts) if j % 3 != 2 and p.method != "d2c_hydraopt")
    shards = [shard_points(pts, i, 3, skip=skip) for i in range(3)]
    ids = [p.id for s in shards for p in s]
    assert sorted(ids) == sorted(p.id for p in pts) and len(ids) == len(set(ids))
    assert skip <= {p.id for p in shards[0]}
    todo = [[p for p in s if p.id not in skip and p.method != "d2c_hydraopt"] for s in shards]
    assert max(map(len, todo)) - min(map(len, todo)) <= 1 and min(map(len, todo)) >= 1
    for s in shards:  # still with its search when that search is left to compute
        mine = {p.id for p in s}
        for p in s:
            d2c = f"cluster-d2c-moved_k{p.k}_s{p.seed}"
            if p.method == "d2c_hydraopt" and d2c not in skip:
                assert d2c in mine


def test_d2c_hydraopt_takes_the_clusters_of_a_reused_d2c_point(setup, run, cli, tmp_path):
    """D2C x HydraOpt left to compute while its D2C point is reused: the recorded clusters are used
    (the search is not rerun; the clusters here are doctored to tell them apart)."""
    import copy
    import shutil

    root, cfg, names = setup
    work = tmp_path / "w"
    shutil.copytree(root / "work", work)
    for f in (work / "points").iterdir():
        f.unlink()
    doc = copy.deepcopy(run)
    doc["points"] = [p for p in doc["points"] if p["method"] != "d2c_hydraopt"]
    d2c = next(p for p in doc["points"] if p["id"] == "cluster-d2c-moved_k2_s0")
    d2c["partition"] = {t: int(j < 2) for j, t in enumerate(names)}
    (tmp_path / "old.json").write_text(json.dumps(doc))
    r = cli("adapters", "benchmark", str(cfg), "--out", str(work), "--reuse", str(tmp_path / "old.json"),
            "--json", str(tmp_path / "new.json"))
    assert r.exit_code == 0, r
    by = {p["id"]: p for p in json.loads((tmp_path / "new.json").read_text())["points"]}
    hyd = by["d2c_hydraopt_k2_s0"]
    assert "reused_from" not in hyd and hyd["partition"] == d2c["partition"]
    assert hyd["clustering"] == {"from_point": "cluster-d2c-moved_k2_s0"}
    assert not list((work / "points").glob("*.state.json"))  # no search ran


def test_sharded_processes_share_one_work_folder(setup, tmp_path):
    """Two shards at once (shard 1 waits for shard 0's folder and library, both wait for every
    adapter), then an unsharded run finds every point done and writes the results."""
    import os
    import subprocess
    import sys

    root, cfg, _ = setup
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "romscale", "adapters", "benchmark", str(cfg), "--out", str(work)]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 0)]  # shard 1 first: it must wait for shard 0
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    trained = [line.split(":")[0] for log in logs for line in log.splitlines() if " steps in " in line]
    assert sorted(trained) == sorted(["upper-en", "upper-de", "copy-en", "copy-de"])  # each task trained once
    r = subprocess.run(cmd + ["--json", str(tmp_path / "r.json"), "--report-only"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    cfg_plan = plan(AdapterBenchmarkConfig(bank="b", budgets=(2,), seeds={"d2c": 1, "random": 2},
                                           single_merges=("task_arithmetic", "ties"), hydraopt_storage=(0.5,)), 4)
    assert not res["missing"] and sorted(p["id"] for p in res["points"]) == sorted(p.id for p in cfg_plan)


def test_shard_option_is_checked(setup, cli, tmp_path):
    _, cfg, _ = setup
    for bad in ("2/2", "1", "a/b", "-1/2"):
        assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "w"), "--shard", bad), "--shard")
    assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "w"), "--shard", "0/2",
                           "--json", str(tmp_path / "r.json")), "--shard")
    assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "none"), "--report-only"), "--report-only")
    assert not (tmp_path / "none").exists()


def test_reuse_takes_the_points_of_a_run_on_the_same_library(setup, run, cli, tmp_path):
    """A fresh work folder retrains the same adapters (same seed, CPU): the fingerprints agree and
    every point is taken from the results file instead of being recomputed."""
    root, cfg, _ = setup
    r = cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "w"), "--reuse", str(root / "r.json"),
            "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["library"]["sha256"] == run["library"]["sha256"] and not res["missing"]
    assert {p["id"]: p["scores"] for p in res["points"]} == {p["id"]: p["scores"] for p in run["points"]}
    assert all(p["reused_from"] == str(root / "r.json") for p in res["points"])


def _reuse_report(cli, root, cfg, tmp_path, doc):
    """--report-only on a copy of the work folder without its points, reusing `doc`."""
    import shutil

    work = tmp_path / "w"
    if not work.exists():
        shutil.copytree(root / "work", work)
    for f in (work / "points").glob("*.json"):
        f.unlink()
    src = tmp_path / "old.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "new.json"
    if out.exists():
        out.unlink()
    r = cli("adapters", "benchmark", str(cfg), "--out", str(work), "--report-only", "--reuse", str(src), "--json", str(out))
    assert r.exit_code == 0, r
    return json.loads(out.read_text()), r.output


def test_reuse_refuses_another_library_or_other_scoring(setup, run, cli, tmp_path):
    import copy

    root, cfg, _ = setup
    n = len(run["points"])
    res, _ = _reuse_report(cli, root, cfg, tmp_path, run)
    assert len(res["points"]) == n and not res["missing"]
    for change in ("sha", "limit"):
        doc = copy.deepcopy(run)
        if change == "sha":
            doc["library"]["sha256"] = "0" * 64
        else:
            doc["config"]["limit"] = 99
        res, log = _reuse_report(cli, root, cfg, tmp_path, doc)
        assert not res["points"] and len(res["missing"]) == n, change
        assert "nothing reused" in log
    # a file written before fingerprints: matched by the training record, refused when one loss differs
    doc = copy.deepcopy(run)
    del doc["library"]["sha256"]
    res, log = _reuse_report(cli, root, cfg, tmp_path, doc)
    assert len(res["points"]) == n and "training record" in log
    task = next(iter(doc["training"]["record"]["runs"]))
    doc["training"]["record"]["runs"][task]["losses"][-1] += 1e-3
    res, log = _reuse_report(cli, root, cfg, tmp_path, doc)
    assert not res["points"] and task in log


def test_reuse_needs_a_results_file(setup, cli, tmp_path):
    _, cfg, _ = setup
    assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "w"), "--reuse", str(tmp_path / "no.json")),
                       "--reuse")
    (tmp_path / "x.json").write_text("{}")
    assert_usage_error(cli("adapters", "benchmark", str(cfg), "--out", str(tmp_path / "w"), "--reuse", str(tmp_path / "x.json")),
                       "--reuse")


def test_hydraopt_single_investigation_script_reproduces_the_benchmark_points(setup, run, tmp_path):
    """benchmarks/hydraopt_single.py on the benchmark's work folder: its plain HydraOpt and TIES
    rows score what the benchmark's points scored (same library, same examples), and the variants
    are all there; the work folder is left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    root, cfg, _ = setup
    before = sorted(p.name for p in (root / "work" / "points").iterdir())
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "hydraopt_single.py"
    out = tmp_path / "h.json"
    r = subprocess.run([sys.executable, str(script), str(cfg), "--work", str(root / "work"), "--json", str(out),
                        "--n", "2", "--scales", "2", "--data-weights", "0.5", "--references", "ties"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    got = {v["variant"]: v["mean_score"] for v in doc["variants"]}
    assert set(got) == {"ties", "hydraopt", "hydraopt, B x 2 (diagnosis)", "hydraopt, data-aware 0.5"}
    by = {p["id"]: p for p in run["points"]}
    single = min((p for p in run["points"] if p["method"] == "hydraopt"), key=lambda p: p["fraction"])
    assert got["hydraopt"] == pytest.approx(single["mean_score"]) and got["ties"] == pytest.approx(by["merge-ties_s0"]["mean_score"])
    assert doc["library_sha256"] == run["library"]["sha256"]
    assert "--data-weights 0.5 --references ties" in doc["command"]  # the command as run
    assert sorted(p.name for p in (root / "work" / "points").iterdir()) == before
