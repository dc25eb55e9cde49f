"""D2C: data-driven clustering and merging of adapters (Bohdal et al., arXiv 2601.17441).

Hill climbing over partitions of N tasks into K clusters, with the deployment merge inside the
loop (see /work/shared/methods/d2c.md and docs/adapters.md, "Task clusters and D2C"):

1. start from a random *balanced* partition (sizes floor(N/K) or ceil(N/K); the paper leaves
   balanced vs free open: balanced gives every cluster room to improve and no empty start);
2. T times: pick a cluster c with >= 2 members (so no cluster ever empties: exactly K adapters
   stay), another cluster c', and a task t of c, uniformly; then
   - accept="moved" (the paper): l = loss(t | merge(c)), l' = loss(t | merge(c' + t)); keep the
     move only when l' < l (strictly);
   - accept="total": keep it only when the summed loss of every task of c and c' under their
     clusters' merges strictly drops (after the move vs before);
3. merge each final cluster.

One numpy Generator (seeded) draws the start and every pick, whatever is cached, so caching does
not change the result. Merges are cached by member set (an LRU), losses by (task, member set).
The state (partition, iteration, RNG state, history, loss cache, counters) is written atomically
every `state_every` iterations; a run resumed from it ends in the same partition as one that was
never interrupted.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from romscale.adapters.clusterers import (
    ClusterProblem,
    LossFn,
    MergeFn,
    canonical,
    random_balanced,
)
from romscale.adapters.peft_io import LoraAdapter
from romscale.errors import RomscaleError

STATE_KIND = "d2c-state"
STATE_FORMAT, STATE_VERSION = "romscale-d2c-state", 1
Accept = Literal["moved", "total"]


@dataclass(frozen=True)
class D2CConfig:
    """k clusters, T iterations, the acceptance rule, the seed. `merge` and `n` record what the
    problem's merge and loss were built with (the merge method, examples per task); they and `tag`
    (any other merge / loss settings) are part of the state's signature: a state file written
    under other ones is refused."""

    k: int
    iterations: int = 1000
    accept: Accept = "moved"
    seed: int = 0
    merge: str = "ties"
    n: int = 10
    cache: bool = True  # False: every loss and merge is recomputed (the plain path, for checks)
    merge_cache_size: int | None = 64  # merged adapters kept (LRU); None: unbounded
    state_every: int = 1  # write the state file every this many iterations (and at the end)
    tag: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accept not in ("moved", "total"):
            raise RomscaleError(f"d2c: accept must be 'moved' or 'total', got {self.accept!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise RomscaleError(f"d2c: iterations must be an integer >= 0, got {self.iterations!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise RomscaleError(f"d2c: n (examples per task) must be an integer >= 1, got {self.n!r}")
        if self.state_every < 1:
            raise RomscaleError(f"d2c: state_every must be >= 1, got {self.state_every!r}")
        if self.merge_cache_size is not None and self.merge_cache_size < 1:
            raise RomscaleError(f"d2c: merge_cache_size must be >= 1 or None, got {self.merge_cache_size!r}")


@dataclass
class D2CStats:
    """Work done (accumulated over resumed runs): merges and loss evaluations actually computed,
    cache hits, and seconds per phase."""

    merges: int = 0
    merge_cache_hits: int = 0
    loss_calls: int = 0
    loss_evals: int = 0  # task losses computed (a call may compute several)
    loss_cache_hits: int = 0
    merge_s: float = 0.0
    loss_s: float = 0.0
    other_s: float = 0.0
    final_merge_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("merge_s", "loss_s", "other_s", "final_merge_s"):
            d[key] = round(d[key], 4)
        d["total_s"] = round(self.merge_s + self.loss_s + self.other_s + self.final_merge_s, 4)
        return d


@dataclass
class D2CResult:
    partition: dict[str, int]  # canonical numbering (by first task)
    start: dict[str, int]
    history: list[dict[str, Any]]
    stats: D2CStats
    config: D2CConfig
    iterations_done: int
    stopped: str | None  # why the loop ended before T ("no move possible"), else None
    adapters: dict[int, LoraAdapter]  # final cluster -> merged adapter

    @property
    def accepted(self) -> int:
        return sum(1 for h in self.history if h["accepted"])

    def summary(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "method": "d2c",
            "config": cfg,
            "start": self.start,
            "iterations_done": self.iterations_done,
            "accepted_moves": self.accepted,
            "stopped": self.stopped,
            "counts": {k: v for k, v in self.stats.to_dict().items() if not k.endswith("_s")},
            "timings_s": {k: v for k, v in self.stats.to_dict().items() if k.endswith("_s")},
            "history": self.history,
        }


class _Evaluator:
    """The merge and loss callables behind the two caches, timed."""

    def __init__(self, tasks: list[str], merge: MergeFn, loss: LossFn, cfg: D2CConfig, stats: D2CStats) -> None:
        self.tasks, self.merge_fn, self.loss_fn, self.cfg, self.stats = tasks, merge, loss, cfg, stats
        self.merged: OrderedDict[frozenset[int], LoraAdapter] = OrderedDict()
        self.losses: dict[tuple[int, frozenset[int]], float] = {}

    def adapter(self, members: frozenset[int]) -> LoraAdapter:
        if self.cfg.cache and members in self.merged:
            self.merged.move_to_end(members)
            self.stats.merge_cache_hits += 1
            return self.merged[members]
        t0 = time.perf_counter()
        a = self.merge_fn(tuple(self.tasks[i] for i in sorted(members)))
        self.stats.merge_s += time.perf_counter() - t0
        self.stats.merges += 1
        if self.cfg.cache:
            self.merged[members] = a
            if self.cfg.merge_cache_size is not None and len(self.merged) > self.cfg.merge_cache_size:
                self.merged.popitem(last=False)
        return a

    def loss(self, which: list[int], members: frozenset[int]) -> dict[int, float]:
        """Loss of each task in `which` under merge(members): one loss call for the uncached ones."""
        out: dict[int, float] = {}
        todo = []
        for i in which:
            if self.cfg.cache and (i, members) in self.losses:
                out[i] = self.losses[(i, members)]
                self.stats.loss_cache_hits += 1
            else:
                todo.append(i)
        if todo:
            adapter = self.adapter(members)
            names = [self.tasks[i] for i in todo]
            t0 = time.perf_counter()
            values = list(self.loss_fn(names, adapter))
            self.stats.loss_s += time.perf_counter() - t0
            self.stats.loss_calls += 1
            self.stats.loss_evals += len(todo)
            if len(values) != len(todo):
                raise RomscaleError(f"d2c: the loss returned {len(values)} values for {len(todo)} tasks {names}")
            for i, v in zip(todo, values):
                v = float(v)
                if math.isnan(v):
                    raise RomscaleError(f"d2c: the loss of task {self.tasks[i]!r} is NaN under the merge of {sorted(self.tasks[j] for j in members)}")
                out[i] = v
                if self.cfg.cache:
                    self.losses[(i, members)] = v
        return {i: out[i] for i in which}  # in the order asked, cached or not


# ---- state file ---------------------------------------------------------------------------------
def _signature(tasks: list[str], cfg: D2CConfig) -> dict[str, Any]:
    return {"tasks": tasks, "k": cfg.k, "accept": cfg.accept, "seed": cfg.seed, "merge": cfg.merge, "n": cfg.n, "tag": cfg.tag}


def _load_state(path: Path, tasks: list[str], cfg: D2CConfig) -> dict[str, Any]:
    from romscale.utils.outputs import JSON_MARKER, read_json

    s = read_json(path, RomscaleError)
    if not isinstance(s, dict) or s.get(JSON_MARKER) != STATE_KIND or s.get("format") != STATE_FORMAT:
        raise RomscaleError(f"{path}: not a romscale D2C state file; give a new path or the state of an earlier run")
    if s.get("version") != STATE_VERSION:
        raise RomscaleError(f"{path}: D2C state version {s.get('version')!r}; this romscale reads version {STATE_VERSION}")
    want = _signature(tasks, cfg)
    got = s.get("signature")
    if got != want:
        diff = sorted(k for k in want if not isinstance(got, dict) or got.get(k) != want[k])
        raise RomscaleError(f"{path}: this D2C state was written by a run with other {', '.join(diff)}; "
                            f"resume with the same settings or give a new state path")
    it = s.get("iteration")
    if not isinstance(it, int) or it < 0 or it > cfg.iterations:
        raise RomscaleError(f"{path}: the state is at iteration {it!r}; it can be resumed only with iterations >= that (got {cfg.iterations})")
    labels = s.get("labels")
    if not isinstance(labels, list) or len(labels) != len(tasks) or sorted(set(labels)) != list(range(cfg.k)):
        raise RomscaleError(f"{path}: 'labels' must give each of the {len(tasks)} tasks a cluster in 0..{cfg.k - 1}, every cluster used")
    return s


def _save_state(path: Path, tasks: list[str], cfg: D2CConfig, it: int, labels: list[int], start: list[int],
                rng: np.random.Generator, history: list, stats: D2CStats, ev: _Evaluator, stopped: str | None) -> None:
    from romscale.utils.outputs import write_json_output

    obj = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "signature": _signature(tasks, cfg),
        "iteration": it,
        "stopped": stopped,
        "labels": labels,
        "start": start,
        "rng": rng.bit_generator.state,
        "history": history,
        "stats": asdict(stats),
        "loss_cache": [[i, sorted(m), v] for (i, m), v in ev.losses.items()],
        "cache_sizes": {"merged": len(ev.merged), "losses": len(ev.losses)},
    }
    write_json_output(path, obj, kind=STATE_KIND, overwrite=True, what="D2C state")


# ---- the search ---------------------------------------------------------------------------------
def run_d2c(problem: ClusterProblem, cfg: D2CConfig, state: Path | str | None = None, progress: bool = False,
            on_iteration: Callable[[int, D2CStats], None] | None = None) -> D2CResult:
    """Run D2C on `problem` (needs its merge and loss). With `state`, resume from that file when it
    exists and keep it up to date; the final partition is the same as an uninterrupted run's.
    `on_iteration(iterations_done, stats)` is called after every iteration (timing, logging)."""
    if problem.merge is None or problem.loss is None:
        raise RomscaleError("d2c needs the problem's merge and loss callables")
    tasks = list(problem.tasks)
    n, k = len(tasks), cfg.k
    if not 1 <= k <= n:
        raise RomscaleError(f"d2c: K must be in 1..{n} (the number of tasks); got {k}")
    state = Path(state) if state is not None else None
    stats = D2CStats()
    ev = _Evaluator(tasks, problem.merge, problem.loss, cfg, stats)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    stopped: str | None = None
    if state is not None and state.exists():
        s = _load_state(state, tasks, cfg)
        try:
            rng.bit_generator.state = s["rng"]
            labels, start, history, it0, stopped = list(s["labels"]), list(s["start"]), list(s["history"]), s["iteration"], s.get("stopped")
            stats = D2CStats(**s["stats"])
            losses = {(int(i), frozenset(int(j) for j in m)): float(v) for i, m, v in s["loss_cache"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise RomscaleError(f"{state}: a damaged D2C state ({type(exc).__name__}: {exc}); give a new state path") from None
        if len(history) != it0 or len(start) != n:
            raise RomscaleError(f"{state}: a damaged D2C state (history of {len(history)} moves at iteration {it0})")
        ev.stats = stats
        if cfg.cache:
            ev.losses = losses
    else:
        start_map = random_balanced(tasks, k, rng)
        labels, it0 = [start_map[t] for t in tasks], 0
        start = list(labels)
    t_start = time.perf_counter()
    spent0 = stats.merge_s + stats.loss_s

    def members(c: int) -> list[int]:
        return [i for i in range(n) if labels[i] == c]

    bar = tqdm(total=cfg.iterations, initial=it0, desc=f"D2C K={k}", disable=not progress, unit="it")
    it = it0
    try:
        while it < cfg.iterations and stopped is None:
            sizes = np.bincount(labels, minlength=k)
            movable = [c for c in range(k) if sizes[c] >= 2]
            if k < 2 or not movable:
                stopped = "no move possible (K = 1 or every cluster has one task)"
                break
            c = movable[int(rng.integers(len(movable)))]
            others = [x for x in range(k) if x != c]
            c2 = others[int(rng.integers(len(others)))]
            mc = members(c)
            t = mc[int(rng.integers(len(mc)))]
            src, dst_old = frozenset(mc), frozenset(members(c2))
            dst = dst_old | {t}
            rec: dict[str, Any] = {"iteration": it, "task": tasks[t], "from": c, "to": c2}
            if cfg.accept == "moved":
                l_before = ev.loss([t], src)[t]
                l_after = ev.loss([t], dst)[t]
                accepted = l_after < l_before
            else:
                rest = src - {t}
                # c and c' are disjoint before the move, c - t and c' + t after: one dict each.
                before = {**ev.loss(sorted(src), src), **ev.loss(sorted(dst_old), dst_old)}
                after = {**ev.loss(sorted(rest), rest), **ev.loss(sorted(dst), dst)}
                l_before, l_after = before[t], after[t]
                total_before, total_after = math.fsum(before.values()), math.fsum(after.values())  # exact: order-free
                rec.update(total_before=total_before, total_after=total_after)
                accepted = total_after < total_before
            rec.update(loss_before=l_before, loss_after=l_after, accepted=bool(accepted))
            if accepted:
                labels[t] = c2
            history.append(rec)
            it += 1
            bar.update(1)
            if progress:
                bar.set_postfix(accepted=sum(1 for h in history if h["accepted"]), merges=stats.merges, losses=stats.loss_evals)
            if state is not None and (it % cfg.state_every == 0 or it == cfg.iterations):
                stats.other_s += time.perf_counter() - t_start - (stats.merge_s + stats.loss_s - spent0)
                t_start, spent0 = time.perf_counter(), stats.merge_s + stats.loss_s
                _save_state(state, tasks, cfg, it, labels, start, rng, history, stats, ev, None)
            if on_iteration is not None:
                on_iteration(it, stats)
    finally:
        bar.close()
    stats.other_s += time.perf_counter() - t_start - (stats.merge_s + stats.loss_s - spent0)
    if state is not None and stopped is not None:
        _save_state(state, tasks, cfg, it, labels, start, rng, history, stats, ev, stopped)
    final = canonical(tasks, labels)
    t0, merge_s0 = time.perf_counter(), stats.merge_s
    adapters = {final[tasks[min(m)]]: ev.adapter(frozenset(m)) for m in (members(c) for c in range(k))}
    stats.merge_s = merge_s0  # the final merges are their own phase
    stats.final_merge_s += time.perf_counter() - t0
    return D2CResult(final, canonical(tasks, start), history, stats, cfg, it, stopped, dict(sorted(adapters.items())))
