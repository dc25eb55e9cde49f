"""Clustering baselines (romscale/adapters/clusterers.py) and `romscale adapters cluster / route`
with them (D2C's own tests: test_d2c.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_usage_error

from romscale.adapters.bank import AdapterBank
from romscale.adapters.clusterers import (
    CLUSTERERS,
    ClusterProblem,
    Partition,
    cluster_merger,
    get_clusterer,
)
from romscale.adapters.merge import MergeOptions, merge_adapters
from romscale.adapters.peft_io import LoraAdapter, LoraModule, read_peft_adapter
from romscale.errors import RomscaleError

MODS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
BASELINES = ("random", "kmeans", "kmeans_svd", "oracle_family", "oracle_language")


def _planted(groups: int = 3, per: int = 4, seed: int = 0, noise: float = 0.05) -> tuple[AdapterBank, dict[str, int]]:
    """LoRAs around `groups` centres (same A init, B = centre + noise), listed interleaved."""
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(4, 16, generator=g) for m in MODS}
    centres = [{m: torch.randn(8, 4, generator=g) for m in MODS} for _ in range(groups)]
    ads, truth = [], {}
    for i in range(groups * per):
        c = i % groups
        mods = {m: LoraModule(A[m].clone(), centres[c][m] + noise * torch.randn(8, 4, generator=g), 8.0) for m in MODS}
        ads.append(LoraAdapter(f"task{i:02d}", {"base_model_name_or_path": "synthetic", "target_modules": ["q_proj", "v_proj"]}, mods))
        truth[f"task{i:02d}"] = c
    return AdapterBank(ads), truth


def _groups(part) -> set[frozenset[str]]:
    return {frozenset(m) for m in (part.clusters() if isinstance(part, Partition) else _by_label(part))}


def _by_label(assign: dict[str, int]) -> list[list[str]]:
    out: dict[int, list[str]] = {}
    for t, c in assign.items():
        out.setdefault(c, []).append(t)
    return list(out.values())


def _labels(bank: AdapterBank) -> tuple[dict[str, str], dict[str, str]]:
    fam = {t: ("sent", "qa", "mt")[i % 3] for i, t in enumerate(bank.names)}
    lang = {t: ("en", "de")[i // 6] for i, t in enumerate(bank.names)}
    return fam, lang


def test_registry_names_match_the_cli():
    from romscale.adapters.cluster_cli import CLUSTERER_NAMES

    assert tuple(CLUSTERERS) == CLUSTERER_NAMES
    with pytest.raises(RomscaleError, match="unknown clusterer"):
        get_clusterer("spectral")


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_gives_k_nonempty_clusters_and_is_seeded(name):
    bank, _ = _planted()
    fam, lang = _labels(bank)
    problem = ClusterProblem(bank, families=fam, languages=lang)
    c = get_clusterer(name)
    for k in (1, 2, 3, 5, bank.n - 1, bank.n):
        p = c.cluster(problem, k, seed=1)
        assert isinstance(p, Partition) and p.k == k and list(p) == bank.names
        assert all(s >= 1 for s in p.sizes()) and sum(p.sizes()) == bank.n
        assert p[bank.names[0]] == 0  # canonical numbering: clusters by first task
        assert dict(p) == dict(c.cluster(problem, k, seed=1))
    for k in (0, bank.n + 1):
        with pytest.raises(RomscaleError, match="K must be in 1..12"):
            c.cluster(problem, k)


def test_random_is_balanced_and_depends_on_the_seed():
    bank, _ = _planted(groups=1, per=10)
    problem = ClusterProblem(bank)
    parts = [get_clusterer("random").cluster(problem, 3, seed=s) for s in range(6)]
    assert all(sorted(p.sizes()) == [3, 3, 4] for p in parts)
    assert len({tuple(p.values()) for p in parts}) > 1


@pytest.mark.parametrize("name", ["kmeans", "kmeans_svd"])
def test_kmeans_recover_planted_groups(name):
    bank, truth = _planted(groups=3, per=4)
    p = get_clusterer(name).cluster(ClusterProblem(bank), 3, seed=0)
    assert _groups(p) == _groups(truth)


def test_kmeans_svd_options_and_identical_adapters():
    bank, truth = _planted(groups=2, per=3, noise=0.0)  # identical adapters in each group
    for k in (2, 4, 6):  # more clusters than distinct points: still K non-empty clusters
        for name in ("kmeans", "kmeans_svd"):
            p = get_clusterer(name).cluster(ClusterProblem(bank), k, seed=0)
            assert all(s >= 1 for s in p.sizes()) and p.k == k
            assert (p.info["refilled_clusters"] > 0) == (k > 2)
    p = get_clusterer("kmeans_svd").cluster(ClusterProblem(bank), 2, seed=0, keep=0.5, components=2)
    assert _groups(p) == _groups(truth) and p.info["components"] == 2 and p.info["keep"] == 0.5
    with pytest.raises(RomscaleError, match="keep"):
        get_clusterer("kmeans_svd").cluster(ClusterProblem(bank), 2, keep=0.0)
    with pytest.raises(RomscaleError, match="takes no options"):
        get_clusterer("kmeans").cluster(ClusterProblem(bank), 2, keep=0.5)


def test_oracles_group_by_family_and_language():
    bank, _ = _planted()
    fam, lang = _labels(bank)
    problem = ClusterProblem(bank, families=fam, languages=lang)
    by_fam = get_clusterer("oracle_family").cluster(problem, 3)
    assert _groups(by_fam) == _groups({t: ("sent", "qa", "mt").index(f) for t, f in fam.items()})
    by_lang = get_clusterer("oracle_language").cluster(problem, 2)
    assert _groups(by_lang) == _groups({t: ("en", "de").index(x) for t, x in lang.items()})
    # fewer clusters than families: whole families packed together, none split
    two = get_clusterer("oracle_family").cluster(problem, 2)
    for members in two.clusters():
        for f in set(fam[t] for t in members):
            assert all(t in members for t in fam if fam[t] == f)
    # more clusters than languages: every cluster still holds one language
    four = get_clusterer("oracle_language").cluster(problem, 4)
    assert all(len({lang[t] for t in m}) == 1 for m in four.clusters())
    with pytest.raises(RomscaleError, match="needs the problem's families"):
        get_clusterer("oracle_family").cluster(ClusterProblem(bank), 2)
    with pytest.raises(RomscaleError, match="no family for tasks"):
        get_clusterer("oracle_family").cluster(ClusterProblem(bank, families={bank.names[0]: "qa"}), 2)
    with pytest.raises(RomscaleError, match="no language for tasks"):
        get_clusterer("oracle_language").cluster(ClusterProblem(bank, languages={bank.names[0]: "en"}), 2)


def test_cluster_merger():
    bank, _ = _planted(groups=2, per=2)
    merge = cluster_merger(bank, "ties", MergeOptions(density=0.5))
    assert merge(("task01",)) is bank.adapters[1]  # a merge of one is the adapter itself
    two = merge(("task02", "task00"))
    ref = merge_adapters(AdapterBank([bank.adapters[0], bank.adapters[2]]), "ties", MergeOptions(density=0.5)).adapter
    for m in MODS:
        assert torch.equal(two.modules[m].A, ref.modules[m].A) and torch.equal(two.modules[m].B, ref.modules[m].B)
    one = cluster_merger(bank, "ties", singleton="merge")(("task01",))
    assert one is not bank.adapters[1]
    with pytest.raises(RomscaleError, match="unknown merge method"):
        cluster_merger(bank, "nope")
    with pytest.raises(RomscaleError, match="empty"):
        merge(())


# ---- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib6(tmp_path_factory, make_lora):
    """An adapter library (romscale's layout) of 6 tiny-Llama LoRAs."""
    from romscale.adapters.library import create_library
    from romscale.adapters.peft_io import write_peft_adapter

    root = tmp_path_factory.mktemp("lib6")
    lib = create_library(root / "lib", "tiny/llama-64", {"rank": 4})
    for i in range(6):
        src = make_lora(root / f"src{i}", seed=300 + i)
        write_peft_adapter(read_peft_adapter(src), lib / f"t{i}")
    return lib


@pytest.fixture(scope="module")
def bank6(tmp_path_factory):
    from romscale.data.taskbank import Example, write_task_bank

    root = tmp_path_factory.mktemp("bank6")
    tasks = []
    for i in range(6):
        spec = {"name": f"t{i}", "family": ("echo", "upper")[i % 2], "language": ("en", "de", "fr")[i // 2], "metric": "exact_match",
                "template": "Say {input}", "labels": None, "max_new_tokens": 4, "source": "synthetic", "license": "CC0"}
        ex = {s: [Example(f"{s}{j}", f"{s} {i} {j}", f"ab{j}") for j in range(3)] for s in ("train", "val", "test")}
        tasks.append((spec, ex))
    return write_task_bank(tasks, root / "bank")


def test_cli_cluster_and_route(cli, lib6, bank6, tmp_path, tree_hash, tiny_llama):
    from peft import PeftModel

    before = tree_hash(lib6)
    out = tmp_path / "clusters"
    r = cli("adapters", "cluster", "--lib", lib6, "--method", "kmeans", "--k", 2, "--out", out, "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r
    routing = json.loads((out / "routing.json").read_text())
    assert routing["method"] == "kmeans" and routing["k"] == 2 and sorted(routing["tasks"]) == [f"t{i}" for i in range(6)]
    assert sorted(t for c in routing["clusters"] for t in c["members"]) == sorted(routing["tasks"])
    assert json.loads((tmp_path / "c.json").read_text())["romscale_output"] == "adapters-cluster"
    for c in routing["clusters"]:
        model = PeftModel.from_pretrained(tiny_llama(0), str(out / c["name"]))
        assert model.peft_config["default"].peft_type.value == "LORA"
    r = cli("adapters", "route", out, "t3")
    assert r.exit_code == 0 and r.stdout.strip() == str(out / routing["tasks"]["t3"])
    assert tree_hash(lib6) == before
    # the oracles read the bank; each cluster holds one family
    out2 = tmp_path / "fam"
    r = cli("adapters", "cluster", "--lib", lib6, "--bank", bank6, "--method", "oracle_family", "--k", 2, "--out", out2)
    assert r.exit_code == 0, r
    rt = json.loads((out2 / "routing.json").read_text())
    assert [c["families"] for c in rt["clusters"]] == [["echo"], ["upper"]]
    # --tasks selects from the bank (a subset of the library)
    r = cli("adapters", "cluster", "--lib", lib6, "--bank", bank6, "--tasks", "t0,t1,t2", "--method", "random", "--k", 3, "--out", tmp_path / "sel")
    assert r.exit_code == 0, r
    assert sorted(json.loads((tmp_path / "sel" / "routing.json").read_text())["tasks"]) == ["t0", "t1", "t2"]
    # an existing output needs --overwrite
    r = cli("adapters", "cluster", "--lib", lib6, "--method", "random", "--k", 2, "--out", out)
    assert_usage_error(r, "--overwrite")
    assert cli("adapters", "cluster", "--lib", lib6, "--method", "random", "--k", 2, "--out", out, "--overwrite").exit_code == 0


def test_cli_bad_inputs(cli, lib6, bank6, tmp_path, make_lora):
    out = tmp_path / "o"
    base = ("adapters", "cluster", "--lib", lib6, "--out", out)
    assert_usage_error(cli(*base, "--method", "random", "--k", 0), "--k", ">= 1")
    assert_usage_error(cli(*base, "--method", "random", "--k", 7), "--k 7", "1..6")
    assert_usage_error(cli(*base, "--method", "spectral", "--k", 2), "--method", "d2c")
    assert_usage_error(cli(*base, "--method", "d2c", "--k", 2), "--bank", "--base")
    assert_usage_error(cli(*base, "--method", "d2c", "--k", 2, "--bank", bank6), "--base")
    assert_usage_error(cli(*base, "--method", "oracle_language", "--k", 2), "--bank")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--bank", bank6, "--tasks", "t0,zz"), "zz")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--tasks", "t9"), "t9")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--merge", "mean"), "--merge")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--density", 0), "--density")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--accept", "all"), "--accept")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--threads", 0), "--threads")
    assert_usage_error(cli(*base, "--method", "kmeans", "--k", 2, "--state", tmp_path / "s.json"), "--state", "kmeans")
    assert_usage_error(cli(*base, "--method", "random", "--k", 2, "--json", out / "x.json"), "--json", "inside")
    assert_usage_error(cli("adapters", "cluster", "--lib", tmp_path / "none", "--method", "random", "--k", 2, "--out", out), "--lib")
    assert_usage_error(cli("adapters", "cluster", "--lib", lib6, "--method", "random", "--k", 2, "--out", lib6 / "t0"), "input")
    # a library task the bank does not know
    from romscale.data.taskbank import Example, write_task_bank

    spec = {"name": "t0", "family": "echo", "language": "en", "metric": "exact_match", "template": "{input}", "labels": None,
            "max_new_tokens": 4, "source": "synthetic", "license": "CC0"}
    small = write_task_bank([(spec, {s: [Example("a", s, "b")] for s in ("train", "val", "test")})], tmp_path / "small")
    assert_usage_error(cli(*base, "--method", "oracle_family", "--k", 2, "--bank", small), "t1")
    assert not out.exists()
    # route: unknown task, a folder that is not a cluster output
    good = tmp_path / "good"
    assert cli("adapters", "cluster", "--lib", lib6, "--method", "random", "--k", 2, "--out", good).exit_code == 0
    assert_usage_error(cli("adapters", "route", good, "t42"), "t42", "t0")
    assert_usage_error(cli("adapters", "route", lib6, "t0"), "adapter-clusters")
    assert_usage_error(cli("adapters", "route", tmp_path / "nope", "t0"), "OUT")
