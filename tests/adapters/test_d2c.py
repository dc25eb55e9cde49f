"""D2C (romscale/adapters/d2c.py): the search on synthetic losses (a deterministic function of
(task, member set)), then on a tiny Llama with real LoRAs, the model-backed loss and the CLI."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from romscale.adapters.bank import AdapterBank
from romscale.adapters.clusterers import ClusterProblem, get_clusterer
from romscale.adapters.d2c import D2CConfig, run_d2c
from romscale.adapters.peft_io import LoraAdapter, LoraModule
from romscale.errors import RomscaleError

MOD = "model.layers.0.self_attn.q_proj"


# ---- synthetic problem --------------------------------------------------------------------------
def _bank(n: int) -> AdapterBank:
    ads = [LoraAdapter(f"t{i}", {"base_model_name_or_path": "synthetic"}, {MOD: LoraModule(torch.full((1, 2), float(i)), torch.ones(2, 1), 1.0)})
           for i in range(n)]
    return AdapterBank(ads)


class Synthetic:
    """merge(members) -> an adapter naming its members; loss(t | S) = share of S outside t's group
    + a deterministic jitter of (t, S). Records every call."""

    def __init__(self, n: int, groups: int = 2, fail_after: int | None = None) -> None:
        self.group = {f"t{i}": i % groups for i in range(n)}
        self.calls: list[tuple[list[str], frozenset[str]]] = []
        self.merges: list[frozenset[str]] = []
        self.fail_after = fail_after

    def value(self, t: str, members: frozenset[str]) -> float:
        off = sum(1 for m in members if self.group[m] != self.group[t]) / len(members)
        jitter = zlib.crc32(f"{t}|{','.join(sorted(members))}".encode()) / 2**32
        return 1.0 + off + 0.05 * jitter

    def merge(self, members: tuple[str, ...]) -> LoraAdapter:
        self.merges.append(frozenset(members))
        return LoraAdapter("+".join(members), {}, {})

    def loss(self, tasks: list[str], adapter: LoraAdapter) -> list[float]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        members = frozenset(adapter.name.split("+"))
        self.calls.append((list(tasks), members))
        return [self.value(t, members) for t in tasks]

    def problem(self, bank: AdapterBank) -> ClusterProblem:
        return ClusterProblem(bank, merge=self.merge, loss=self.loss)


def _replay(start: dict[str, int], history: list[dict], k: int) -> list[dict[str, int]]:
    """The running labelling after each iteration (cluster indices as the history records them)."""
    # the start is canonical, and so is the run's internal numbering at the start
    cur = dict(start)
    states = []
    for h in history:
        assert h["from"] != h["to"]
        assert cur[h["task"]] == h["from"]
        if h["accepted"]:
            cur[h["task"]] = h["to"]
        states.append(dict(cur))
    return states


def _groups(assign: dict[str, int]) -> set[frozenset[str]]:
    out: dict[int, set[str]] = {}
    for t, c in assign.items():
        out.setdefault(c, set()).add(t)
    return {frozenset(v) for v in out.values()}


@pytest.mark.parametrize("accept", ["moved", "total"])
def test_moves_strict_and_clusters_never_empty(accept):
    n, k = 9, 3
    syn = Synthetic(n)
    res = run_d2c(syn.problem(_bank(n)), D2CConfig(k=k, iterations=150, accept=accept, seed=3))
    assert res.iterations_done == 150 and len(res.history) == 150
    assert 0 < res.accepted < 150
    sizes = sorted(list(res.start.values()).count(c) for c in range(k))
    assert sizes == [3, 3, 3]  # balanced start
    states = _replay(res.start, res.history, k)
    for st in states:
        assert len(set(st.values())) == k  # no cluster ever empties
    for i, h in enumerate(res.history):
        before = res.start if i == 0 else states[i - 1]
        src = frozenset(t for t, c in before.items() if c == h["from"])
        dst = frozenset(t for t, c in before.items() if c == h["to"]) | {h["task"]}
        assert len(src) >= 2
        assert h["loss_before"] == syn.value(h["task"], src)
        assert h["loss_after"] == syn.value(h["task"], dst)
        if accept == "moved":
            assert h["accepted"] == (h["loss_after"] < h["loss_before"])
        else:
            tb = sum(syn.value(t, src) for t in src) + sum(syn.value(t, dst - {h["task"]}) for t in dst - {h["task"]})
            ta = sum(syn.value(t, src - {h["task"]}) for t in src - {h["task"]}) + sum(syn.value(t, dst) for t in dst)
            assert h["total_before"] == pytest.approx(tb, abs=1e-12) and h["total_after"] == pytest.approx(ta, abs=1e-12)
            assert h["accepted"] == (h["total_after"] < h["total_before"])
    assert _groups(states[-1]) == _groups(res.partition)
    assert set(res.partition.values()) == set(range(k))
    # the final adapters are the merges of the final clusters
    for c, a in res.adapters.items():
        assert frozenset(a.name.split("+")) == frozenset(t for t, x in res.partition.items() if x == c)


def test_total_rule_never_raises_the_summed_loss_and_finds_the_groups():
    n, k = 8, 2
    syn = Synthetic(n)

    def total(assign):
        return sum(syn.value(t, frozenset(u for u, c in assign.items() if c == assign[t])) for t in assign)

    res = run_d2c(syn.problem(_bank(n)), D2CConfig(k=k, iterations=200, accept="total", seed=0))
    states = _replay(res.start, res.history, k)
    values = [total(res.start)] + [total(s) for s in states]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert _groups(res.partition) == {frozenset(f"t{i}" for i in range(0, n, 2)), frozenset(f"t{i}" for i in range(1, n, 2))}


def test_few_loss_calls_per_iteration_and_only_members_scored():
    n, k = 8, 2
    for accept, most in (("moved", 2), ("total", 4)):
        syn = Synthetic(n)
        res = run_d2c(syn.problem(_bank(n)), D2CConfig(k=k, iterations=40, accept=accept, seed=1))
        assert res.stats.loss_calls == len(syn.calls) <= most * 40
        for tasks, members in syn.calls:
            assert tasks and set(tasks) <= members  # a call scores tasks under their own cluster's merge
            assert len(set(tasks)) == len(tasks)
        if accept == "total":  # each call asks for every uncached task of the cluster at once
            assert max(len(t) for t, _ in syn.calls) >= 3
        assert res.stats.loss_evals == sum(len(t) for t, _ in syn.calls)
        assert res.stats.merges == len(syn.merges)


@pytest.mark.parametrize("accept", ["moved", "total"])
def test_caches_give_the_same_result_as_no_caches(accept):
    n, k = 10, 3
    a, b, c = Synthetic(n), Synthetic(n), Synthetic(n)
    on = run_d2c(a.problem(_bank(n)), D2CConfig(k=k, iterations=120, accept=accept, seed=5))
    off = run_d2c(b.problem(_bank(n)), D2CConfig(k=k, iterations=120, accept=accept, seed=5, cache=False))
    small = run_d2c(c.problem(_bank(n)), D2CConfig(k=k, iterations=120, accept=accept, seed=5, merge_cache_size=1))
    assert on.partition == off.partition == small.partition
    assert on.history == off.history == small.history
    assert on.stats.loss_evals < off.stats.loss_evals and on.stats.loss_cache_hits > 0
    assert on.stats.merges < off.stats.merges and on.stats.merge_cache_hits > 0
    assert off.stats.loss_cache_hits == off.stats.merge_cache_hits == 0
    assert small.stats.merges >= on.stats.merges


def test_seeded():
    n, k = 9, 3
    r1 = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=60, seed=7))
    r2 = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=60, seed=7))
    r3 = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=60, seed=8))
    assert r1.history == r2.history and r1.partition == r2.partition
    assert r1.history != r3.history


def test_on_iteration_sees_every_iteration_with_running_counts(tmp_path):
    n, k = 9, 3
    seen = []
    cb = lambda it, stats: seen.append((it, stats.loss_evals))  # noqa: E731
    res = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=25, seed=7), on_iteration=cb)
    assert [it for it, _ in seen] == list(range(1, 26))
    counts = [c for _, c in seen]
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert res.history == run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=25, seed=7)).history
    # a resumed run reports the iterations it runs, numbered from where it starts
    state, seen2 = tmp_path / "s.json", []
    run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=10, seed=7), state=state)
    run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=25, seed=7), state=state,
            on_iteration=lambda it, stats: seen2.append(it))
    assert seen2 == list(range(11, 26))


@pytest.mark.parametrize("accept,every", [("moved", 1), ("total", 3)])
def test_resume_after_a_kill_gives_the_same_partition(tmp_path, accept, every):
    n, k, T = 10, 3, 90
    ref = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=T, accept=accept, seed=2))
    state = tmp_path / "d2c-state.json"
    cfg = D2CConfig(k=k, iterations=T, accept=accept, seed=2, state_every=every)
    with pytest.raises(KeyboardInterrupt):
        run_d2c(Synthetic(n, fail_after=37).problem(_bank(n)), cfg, state=state)
    saved = json.loads(state.read_text())
    assert 0 < saved["iteration"] < T and saved["romscale_output"] == "d2c-state"
    assert saved["iteration"] % every == 0 and len(saved["history"]) == saved["iteration"]
    second = Synthetic(n)
    res = run_d2c(second.problem(_bank(n)), cfg, state=state)
    assert res.partition == ref.partition and res.history == ref.history and res.start == ref.start
    # the saved loss cache is reused: the resumed run does not recompute what was saved
    asked = {(t, m) for ts, m in second.calls for t in ts}
    assert not asked & {(f"t{i}", frozenset(f"t{j}" for j in m)) for i, m, _ in saved["loss_cache"]}
    # stopping at T1 then resuming with more iterations is the same as running T at once
    state2 = tmp_path / "two.json"
    run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=40, accept=accept, seed=2), state=state2)
    res2 = run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=T, accept=accept, seed=2), state=state2)
    assert res2.partition == ref.partition and res2.history == ref.history
    assert json.loads(state2.read_text())["iteration"] == T


def test_state_from_other_settings_is_refused(tmp_path):
    n = 6
    state = tmp_path / "s.json"
    run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=2, iterations=5, seed=0, tag={"merge": "ties"}), state=state)
    for cfg, needle in ((D2CConfig(k=3, iterations=5, seed=0, tag={"merge": "ties"}), "k"),
                        (D2CConfig(k=2, iterations=5, seed=1, tag={"merge": "ties"}), "seed"),
                        (D2CConfig(k=2, iterations=5, seed=0, accept="total", tag={"merge": "ties"}), "accept"),
                        (D2CConfig(k=2, iterations=5, seed=0, tag={"merge": "linear"}), "tag"),
                        (D2CConfig(k=2, iterations=5, seed=0, merge="linear", tag={"merge": "ties"}), "other merge;"),
                        (D2CConfig(k=2, iterations=5, seed=0, n=5, tag={"merge": "ties"}), "other n;"),
                        (D2CConfig(k=2, iterations=3, seed=0, tag={"merge": "ties"}), "iteration")):
        with pytest.raises(RomscaleError, match=needle):
            run_d2c(Synthetic(n).problem(_bank(n)), cfg, state=state)
    with pytest.raises(RomscaleError, match="other tasks"):
        run_d2c(Synthetic(n + 1).problem(_bank(n + 1)), D2CConfig(k=2, iterations=5, seed=0, tag={"merge": "ties"}), state=state)
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(RomscaleError, match="not a romscale D2C state"):
        run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=2, iterations=5), state=other)


def test_degenerate_k_and_bad_inputs():
    n = 5
    for k in (1, n):
        syn = Synthetic(n)
        res = run_d2c(syn.problem(_bank(n)), D2CConfig(k=k, iterations=20))
        assert res.stopped and res.iterations_done == 0 and res.history == [] and not syn.calls
        assert res.partition == res.start and len(res.adapters) == k
    for k in (0, n + 1):
        with pytest.raises(RomscaleError, match="K must be in 1..5"):
            run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=k, iterations=5))
    with pytest.raises(RomscaleError, match="merge and loss"):
        run_d2c(ClusterProblem(_bank(n)), D2CConfig(k=2))
    with pytest.raises(RomscaleError, match="accept"):
        D2CConfig(k=2, accept="any")  # type: ignore[arg-type]
    with pytest.raises(RomscaleError, match="iterations"):
        D2CConfig(k=2, iterations=-1)
    syn = Synthetic(n)
    nan = ClusterProblem(_bank(n), merge=syn.merge, loss=lambda ts, a: [math.nan] * len(ts))
    with pytest.raises(RomscaleError, match="NaN"):
        run_d2c(nan, D2CConfig(k=2, iterations=3))
    short = ClusterProblem(_bank(n), merge=syn.merge, loss=lambda ts, a: [])
    with pytest.raises(RomscaleError, match="returned 0 values"):
        run_d2c(short, D2CConfig(k=2, iterations=3))


def test_registry_entry_runs_d2c():
    n = 8
    part = get_clusterer("d2c").cluster(Synthetic(n).problem(_bank(n)), 2, seed=0, iterations=100, accept="total")
    assert part.k == 2 and sorted(part.sizes()) == [4, 4] and part.info["method"] == "d2c"
    assert part.info["counts"]["loss_evals"] > 0 and "merge_s" in part.info["timings_s"]
    assert set(part.adapters) == {0, 1}
    assert part.assignment == dict(part) and part.assignment is not part.assignment
    cfg = D2CConfig(k=2, seed=3, iterations=40, accept="total")
    via_config = get_clusterer("d2c").cluster(Synthetic(n).problem(_bank(n)), 2, seed=3, config=cfg)
    assert dict(via_config) == dict(run_d2c(Synthetic(n).problem(_bank(n)), cfg).partition)
    for bad in ({"config": cfg, "iterations": 3}, {"config": D2CConfig(k=3, seed=3)}):
        with pytest.raises(RomscaleError, match="d2c: "):
            get_clusterer("d2c").cluster(Synthetic(n).problem(_bank(n)), 2, seed=3, **bad)
    with pytest.raises(RomscaleError, match="needs the problem's merge"):
        get_clusterer("d2c").cluster(ClusterProblem(_bank(n)), 2)
    with pytest.raises(RomscaleError, match="d2c"):
        get_clusterer("d2c").cluster(Synthetic(n).problem(_bank(n)), 2, bogus=1)


# ---- on a tiny Llama: the model-backed loss, D2C with it, the CLI --------------------------------
TASKS4 = ("t0", "t1", "t2", "t3")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny forwards on a shared 2-core CPU: one thread avoids spin-waits (~25x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_bank(out: Path, empty_val: str | None = None) -> Path:
    from romscale.data.taskbank import Example, write_task_bank

    tasks = []
    for i, name in enumerate(TASKS4):
        spec = {"name": name, "family": ("copy", "shout")[i % 2], "language": ("en", "de")[i // 2], "metric": "exact_match",
                "template": "say {input}", "labels": None, "max_new_tokens": 4, "source": "synthetic", "license": "CC0"}
        ex = {s: [Example(f"{s}{j}", f"{s} {name} {j}", ("abc", "XYZ")[i % 2] + str(j)) for j in range(3)] for s in ("train", "val", "test")}
        if name == empty_val:
            ex["val"] = []
        tasks.append((spec, ex))
    return write_task_bank(tasks, out)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, make_lora, tiny_llama):
    """(library, task bank, base model folder): 4 LoRAs of the tiny Llama, a 4-task bank, the
    Llama saved with a byte-level tokenizer."""
    from conftest import hf_tokenizer

    from romscale.adapters.library import create_library
    from romscale.adapters.peft_io import read_peft_adapter, write_peft_adapter

    root = tmp_path_factory.mktemp("d2c_tiny")
    lib = create_library(root / "lib", "tiny/llama-64", {"rank": 4})
    for i, name in enumerate(TASKS4):
        write_peft_adapter(read_peft_adapter(make_lora(root / f"src{i}", seed=700 + i, std=0.3)), lib / name)
    base = root / "base"
    tiny_llama(0).save_pretrained(base)
    hf_tokenizer().save_pretrained(base)
    return lib, _write_bank(root / "bank"), base


def _evaluator(base: Path):
    from romscale.eval.generate import TaskEvaluator
    from romscale.eval.slot import AdapterSlot
    from romscale.models import load_causal_lm

    model, tok = load_causal_lm(base)
    slot = AdapterSlot(model, rank=4)
    return TaskEvaluator(slot.base, tok, slot, batch_size=4)


def test_model_loss_factored_matches_plain(tiny_setup, tmp_path):
    from romscale.adapters.clusterers import cluster_merger
    from romscale.adapters.library import load_library
    from romscale.adapters.taskloss import model_loss
    from romscale.data.taskbank import TaskBank

    lib, bank_dir, base = tiny_setup
    ev = _evaluator(base)
    adapters, tb = load_library(lib), TaskBank.open(bank_dir)
    merged = cluster_merger(adapters, "ties")(("t0", "t2"))
    seen = []
    real = ev.losses
    ev.losses = lambda items, share_prefix=False: (  # type: ignore[method-assign]
        seen.append([(t.name, len(e)) for t, e in items]) or real(items, share_prefix=share_prefix))
    fact = model_loss(ev, tb, n=2, share_prefix=False)(["t0", "t2", "t1"], merged)
    assert seen == [[("t0", 2), ("t2", 2), ("t1", 2)]]  # one call: the tasks batched under one adapter
    assert model_loss(ev, tb, n=2)(["t0", "t2", "t1"], merged) == pytest.approx(fact, abs=1e-5)  # CPU: shared prefixes
    seen.clear()
    plain = model_loss(ev, tb, n=2, mode="plain")(["t0", "t2", "t1"], merged)
    assert seen == [[("t0", 2)], [("t2", 2)], [("t1", 2)]]  # plain: one task at a time
    assert fact == pytest.approx(plain, abs=1e-4)
    ev.slot.set(None)
    zero_shot = real([(tb.task("t0"), tb.task("t0").examples("val", 2))])
    assert abs(zero_shot[0] - fact[0]) > 1e-3  # the adapter matters
    assert model_loss(ev, tb, n=3)(["t0"], merged) != pytest.approx(fact[:1], abs=1e-9)
    with pytest.raises(RomscaleError, match="no loss examples"):
        model_loss(ev, tb, n=2, tasks=["t0"])(["t1"], merged)
    with pytest.raises(RomscaleError, match="'t1' has no val examples"):
        model_loss(ev, TaskBank.open(_write_bank(tmp_path / "b", empty_val="t1")), n=2)
    with pytest.raises(RomscaleError, match="mode"):
        model_loss(ev, tb, mode="dense")  # type: ignore[arg-type]


def test_d2c_with_the_model_loss(tiny_setup):
    from romscale.adapters.clusterers import cluster_merger
    from romscale.adapters.library import load_library
    from romscale.adapters.taskloss import model_loss
    from romscale.data.taskbank import TaskBank

    lib, bank_dir, base = tiny_setup
    ev = _evaluator(base)
    adapters, tb = load_library(lib), TaskBank.open(bank_dir)
    merge = cluster_merger(adapters, "ties")
    loss = model_loss(ev, tb, n=2)
    runs = {}
    for cache in (True, False):
        problem = ClusterProblem(adapters, merge=merge, loss=loss)
        runs[cache] = run_d2c(problem, D2CConfig(k=2, iterations=8, seed=4, cache=cache))
    on, off = runs[True], runs[False]
    assert on.partition == off.partition and on.history == off.history
    assert on.stats.loss_evals < off.stats.loss_evals
    for h in on.history:
        assert h["accepted"] == (h["loss_after"] < h["loss_before"])
    total = run_d2c(ClusterProblem(adapters, merge=merge, loss=loss), D2CConfig(k=2, iterations=6, seed=4, accept="total"))
    assert all(h["accepted"] == (h["total_after"] < h["total_before"]) for h in total.history)
    assert set(total.partition.values()) == {0, 1}


def test_cli_d2c_writes_clusters_resumes_and_routes(cli, tiny_setup, tmp_path, tree_hash):
    from conftest import _tiny_llama
    from peft import PeftModel

    lib, bank_dir, base = tiny_setup
    hashes = [tree_hash(p) for p in (lib, bank_dir, base)]
    common = ("adapters", "cluster", "--lib", lib, "--bank", bank_dir, "--base", base, "--method", "d2c", "--k", 2, "--n", 2, "--threads", 1, "--seed", 1)
    full = tmp_path / "full"
    r = cli(*common, "--iterations", 10, "--out", full)
    assert r.exit_code == 0, r
    assert "Loading weights" not in r.stderr and "D2C K=" not in r.stderr  # progress bars only on a terminal
    rt = json.loads((full / "routing.json").read_text())
    assert rt["method"] == "d2c" and rt["options"]["iterations"] == 10 and rt["options"]["merge"] == "ties"
    assert rt["counts"]["loss_evals"] > 0 and rt["counts"]["merges"] > 0
    assert {"merge_s", "loss_s", "other_s"} <= set(rt["timings_s"]["method"])
    assert len(rt["method_info"]["history"]) == 10
    for c in rt["clusters"]:
        PeftModel.from_pretrained(_tiny_llama(0), str(full / c["name"]))
    # interrupted at 4 iterations (the state written), resumed to 10: the same clusters
    state = tmp_path / "state.json"
    assert cli(*common, "--iterations", 4, "--state", state, "--out", tmp_path / "part").exit_code == 0
    assert json.loads(state.read_text())["iteration"] == 4
    r = cli(*common, "--iterations", 10, "--state", state, "--out", tmp_path / "resumed")
    assert r.exit_code == 0, r
    resumed = json.loads((tmp_path / "resumed" / "routing.json").read_text())
    assert resumed["tasks"] == rt["tasks"] and resumed["method_info"]["history"] == rt["method_info"]["history"]
    assert_state = cli(*common[:-2], "--seed", 2, "--iterations", 10, "--state", state, "--out", tmp_path / "x")
    assert assert_state.exit_code == 2 and "seed" in assert_state.stderr
    t = rt["tasks"]["t2"]
    r = cli("adapters", "route", full, "t2")
    assert r.exit_code == 0 and r.stdout.strip() == str(full / t)
    assert [tree_hash(p) for p in (lib, bank_dir, base)] == hashes
    # a task without examples: one error line, before the model is loaded
    bad = _write_bank(tmp_path / "badbank", empty_val="t3")
    r = cli("adapters", "cluster", "--lib", lib, "--bank", bad, "--base", base, "--method", "d2c", "--k", 2, "--out", tmp_path / "y")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "'t3' has no val examples" in r.stderr, r
    r = cli(*common, "--iterations", 2, "--state", lib / "library.json", "--out", tmp_path / "z")
    assert r.exit_code == 2 and "--state" in r.stderr, r
    if not torch.cuda.is_available():
        r = cli(*common, "--iterations", 2, "--device", "cuda", "--out", tmp_path / "w")
        assert r.exit_code == 2 and "--device cuda" in r.stderr and not (tmp_path / "w").exists(), r


def test_d2c_partition_as_hydraopt_b_groups(tiny_setup):
    """D2C x HydraOpt: a task grouping passed as HydraOpt's B groups (storage fixed by K_A, K_B, rank)."""
    from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt, fit_hydraopt_grouped, storage_params
    from romscale.adapters.library import load_library

    bank = load_library(tiny_setup[0])
    groups = [0, 1, 1, 0]
    one_a = fit_hydraopt(bank, HydraOptConfig(k_a=1, b_groups=groups))
    same = fit_hydraopt(bank, HydraOptConfig(k_a=2, k_b=2, b_groups=groups))
    finer = fit_hydraopt(bank, HydraOptConfig(k_a=4, k_b=2, b_groups=groups))
    for mf in one_a.modules.values():
        assert mf.b_group.tolist() == groups and mf.a_group.tolist() == [0, 0, 0, 0]
    for mf in same.modules.values():
        assert mf.b_group.tolist() == groups and mf.a_group.tolist() == groups
    for mf in finer.modules.values():
        assert mf.b_group.tolist() == groups and len(set(mf.a_group.tolist())) == 4
    assert one_a.fit["chosen"]["params"] == storage_params(bank, 1, 2)
    assert same.fit["chosen"]["params"] == storage_params(bank, 2, 2)  # = two rank-r LoRAs: D2C's storage at K = 2
    assert same.fit["config"]["b_groups"] == groups
    grouped = fit_hydraopt_grouped(bank, groups)  # default K_A = K: the storage of K merged LoRAs
    assert grouped.fit["chosen"]["params"] == same.fit["chosen"]["params"] == 2 * bank.storage().params // 4
    assert grouped.fit["objective"] == pytest.approx(same.fit["objective"], abs=1e-12)
    # more A groups never fit worse (nested refinements of the same B groups)
    err = [b.fit["objective"] for b in (one_a, same, finer)]  # each an exact optimum of its nested structure
    assert err[0] >= err[1] - 1e-9 and err[1] >= err[2] - 1e-9 and err[0] > err[2]
    for cfg, needle in ((HydraOptConfig(k_a=1, k_b=3, b_groups=groups), "0..2"),
                        (HydraOptConfig(k_a=1, b_groups=[0, 1, 0]), "each of the 4 tasks"),
                        (HydraOptConfig(k_a=2, k_b=3, b_groups=[0, 1, 2, 2]), "K_A must be 1"),
                        (HydraOptConfig(k_a=1, b_groups=groups, grouping="independent"), "nested")):
        with pytest.raises(RomscaleError, match=needle):
            fit_hydraopt(bank, cfg)
    from romscale.adapters.hydraopt import fit_hydraopt_many

    with pytest.raises(RomscaleError, match="explicit configuration"):
        fit_hydraopt_many(bank, HydraOptConfig(b_groups=groups), [0.5])


def test_damaged_state_is_refused(tmp_path):
    n = 6
    state = tmp_path / "s.json"
    run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=2, iterations=5), state=state)
    doc = json.loads(state.read_text())
    for key, value in (("rng", {"bit_generator": "nope"}), ("stats", {"merges": 1, "bogus": 2}), ("history", [])):
        bad = dict(doc, **{key: value})
        state.write_text(json.dumps(bad))
        with pytest.raises(RomscaleError, match="damaged D2C state"):
            run_d2c(Synthetic(n).problem(_bank(n)), D2CConfig(k=2, iterations=5), state=state)


@pytest.mark.parametrize("accept", ["moved", "total"])
def test_equal_loss_is_not_a_move(accept):
    """Strictly lower only: under a loss that never changes, no move is kept."""
    n = 6
    syn = Synthetic(n)
    flat = ClusterProblem(_bank(n), merge=syn.merge, loss=lambda ts, a: [1.0] * len(ts))
    res = run_d2c(flat, D2CConfig(k=2, iterations=30, accept=accept, seed=0))
    assert res.accepted == 0 and res.partition == res.start and len(res.history) == 30
