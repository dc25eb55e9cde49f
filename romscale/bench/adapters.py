"""The score-vs-storage benchmark of an adapter library (`romscale adapters benchmark CONFIG.yaml`).

One run: train one LoRA per task of a bank (or reuse them), then score every method on the bank's
tasks with ONE loaded base model, the adapter of each task applied in factored form:
    zero-shot (0 %), individual LoRAs (100 %), single merged adapters (TA / TIES / DARE / KnOTS),
    clusterings at K adapters (D2C with both acceptance rules, random, K-means, K-means+SVD, the two
    oracles), each cluster merged with the deployment merge, HydraOpt along its storage curve, and
    D2C x HydraOpt (HydraOpt's B groups = D2C's clusters).
Every finished point is saved in the work folder (`points/<id>.json`), so an interrupted run resumes
where it stopped; trained adapters are reused the same way. Storage is counted in bytes of the
stored factors (with their dtype) as a percentage of the library's bytes, and in parameters.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from romscale.errors import RomscaleError
from romscale.utils.config import build, to_plain
from romscale.utils.outputs import read_json, wait_for_output, work_dir, write_json_output

WORK_KIND = "adapters-benchmark"
RESULT_KIND = "adapters-benchmark-results"
POINT_KIND = "adapters-benchmark-point"


@dataclass(frozen=True)
class AdapterBenchmarkConfig:
    bank: str = field(metadata={"help": "task bank folder (romscale data taskbank)"})
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "base model: HF folder, GGUF file or a packaged model name"})
    tasks: Optional[str] = field(default="cpu-16", metadata={"help": "a subset name of the bank or comma-separated task names; null: all"})
    budgets: tuple[int, ...] = field(default=(2, 4), metadata={"help": "K, the number of stored adapters, for every clusterer"})
    clusterers: tuple[str, ...] = field(default=("d2c", "random", "kmeans", "kmeans_svd", "oracle_family", "oracle_language"),
                                        metadata={"help": "clusterers to run at every budget (romscale adapters methods)"})
    d2c_accept: tuple[Literal["moved", "total"], ...] = field(default=("moved", "total"), metadata={"help": "D2C acceptance rules to run"})
    seeds: dict[str, int] = field(default_factory=lambda: {"d2c": 2, "random": 2},
                                  metadata={"help": "seeds per clusterer (others: default_seeds)"})
    default_seeds: int = field(default=1, metadata={"help": "seeds for clusterers not named in seeds"})
    merge: str = field(default="ties", metadata={"help": "the deployment merge of every cluster (a merge method name)"})
    density: float = field(default=0.5, metadata={"help": "density of density-based merges"})
    single_merges: tuple[str, ...] = field(default=("task_arithmetic", "ties", "dare_ties", "knots"),
                                           metadata={"help": "methods merging the whole library into one adapter"})
    hydraopt_storage: tuple[float, ...] = field(default=(0.25, 0.5, 0.75), metadata={"help": "HydraOpt storage targets (fractions of the library's bytes)"})
    hydraopt_single: bool = field(default=True, metadata={"help": "also HydraOpt at one adapter's storage (1/N)"})
    d2c_hydraopt: bool = field(default=True, metadata={"help": "D2C x HydraOpt: HydraOpt with B groups from D2C's clusters, at every budget"})
    train: dict[str, Any] = field(default_factory=dict, metadata={"help": "LoRA training options (romscale adapters train; LoraTrainConfig fields)"})
    d2c: dict[str, Any] = field(default_factory=dict, metadata={"help": "D2C options (D2CConfig fields: n, iterations, ...)"})
    split: Literal["test", "val"] = field(default="test", metadata={"help": "split the scores are computed on"})
    limit: Optional[int] = field(default=None, metadata={"help": "examples per task scored (null: the whole split)"})
    batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    eval_bf16: bool = field(default=False, metadata={"help": "bf16 autocast while scoring (a win on GPUs; on CPUs autocast "
                                                     "re-casts the weights at every decode step)"})

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError("budgets must be K values >= 1")
        if self.default_seeds < 1 or any(v < 1 for v in self.seeds.values()):
            raise ValueError("seeds must be >= 1")
        if any(not 0.0 < f <= 1.0 for f in self.hydraopt_storage):
            raise ValueError("hydraopt_storage fractions must be in (0, 1]")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def n_seeds(self, clusterer: str) -> int:
        return int(self.seeds.get(clusterer, self.default_seeds))


@dataclass(frozen=True)
class Point:
    """One method at one budget and seed: the unit that is computed, saved and resumed."""

    method: str  # e.g. "zero_shot", "individual", "merge/ties", "cluster/d2c-moved", "hydraopt", "d2c_hydraopt"
    k: Optional[int] = None  # adapters stored (clusterers)
    fraction: Optional[float] = None  # storage target (HydraOpt)
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.method.replace("/", "-")]
        if self.k is not None:
            parts.append(f"k{self.k}")
        if self.fraction is not None:
            parts.append(f"f{self.fraction:g}")
        parts.append(f"s{self.seed}")
        return "_".join(parts)


def plan(cfg: AdapterBenchmarkConfig, n_tasks: int) -> list[Point]:
    """Every point of the run, cheapest first (references, single merges, HydraOpt, clusterings)."""
    pts = [Point("zero_shot"), Point("individual")]
    pts += [Point(f"merge/{m}") for m in cfg.single_merges]
    if cfg.hydraopt_single:
        # one adapter's bytes; the factor keeps float rounding from putting the budget a byte below it
        pts.append(Point("hydraopt", fraction=(1.0 / n_tasks) * (1 + 1e-9)))
    pts += [Point("hydraopt", fraction=f) for f in cfg.hydraopt_storage]
    for k in cfg.budgets:
        if k > n_tasks:
            raise RomscaleError(f"budget K={k} is larger than the {n_tasks} tasks of the run")
        for c in cfg.clusterers:
            variants = [f"{c}-{a}" for a in cfg.d2c_accept] if c == "d2c" else [c]
            for v in variants:
                pts += [Point(f"cluster/{v}", k=k, seed=s) for s in range(cfg.n_seeds(c))]
        if cfg.d2c_hydraopt and "d2c" in cfg.clusterers:
            pts += [Point("d2c_hydraopt", k=k, seed=s) for s in range(cfg.n_seeds("d2c"))]
    return pts


def shard_points(points: list[Point], i: int, n: int, skip: frozenset[str] = frozenset()) -> list[Point]:
    """Shard i's points of n, round robin in plan order over the points not in `skip` (those reused
    from an earlier run: every shard derives the same set, and the work left is spread evenly);
    D2C x HydraOpt goes with the D2C point whose search (and state file) it reuses, so no two shards
    run one search. Skipped points stay with shard 0, which only copies them."""
    todo = [p for p in points if p.id not in skip]
    index = {p.id: j for j, p in enumerate(todo)}

    def owner(p: Point) -> int:
        if p.id in skip:
            return 0
        if p.method == "d2c_hydraopt":
            return index.get(Point("cluster/d2c-moved", k=p.k, seed=p.seed).id, index[p.id]) % n
        return index[p.id] % n

    return [p for p in points if owner(p) == i]


def _adapter_key(adapter) -> str:
    """A content hash of an adapter's factors: identical adapters share their scores."""
    h = hashlib.sha256()
    for mod, lm in adapter.modules.items():
        h.update(mod.encode())
        for t in (lm.A, lm.B):
            h.update(t.detach().float().contiguous().numpy().tobytes())
        h.update(repr(lm.scaling).encode())
    return h.hexdigest()[:20]


class AdapterBenchmark:
    """Runs (or resumes) a benchmark in a work folder; `run()` returns the results dict."""

    def __init__(self, cfg: AdapterBenchmarkConfig, out: Path, *, overwrite: bool = False, progress: bool = False,
                 log: Callable[[str], None] = print, shard: tuple[int, int] | None = None,
                 reuse: Path | None = None) -> None:
        """`shard=(i, n)`: one of n processes sharing the work (one GPU, say): it trains every n-th
        task and computes every n-th point from the i-th. Shard 0 creates the work folder and the
        library, the others wait for them; every shard waits for all adapters before scoring. An
        unsharded run afterwards finds every point done and writes the results.
        `reuse`: an earlier run's results JSON whose points are taken instead of recomputed, when this
        run scores the same library the same way (see `_reusable`)."""
        self.cfg, self.progress, self.log, self.shard, self.reuse = cfg, progress, log, shard, reuse
        self.bank_dir = Path(cfg.bank)
        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise RomscaleError(f"--shard: expected I/N with 0 <= I < N; got {shard[0]}/{shard[1]}")
        if shard is not None and shard[0] > 0:
            if overwrite:
                raise RomscaleError("--overwrite is for shard 0 only (it would delete the other shards' work)")
            wait_for_output(out, WORK_KIND, what=f"--out {out} (made by shard 0)")
        self.out = work_dir(out, kind=WORK_KIND, inputs=[self.bank_dir], overwrite=overwrite, what="--out")
        (self.out / "points").mkdir(exist_ok=True)
        self._scores: dict[tuple[str, str], dict[str, Any]] = {}  # (task, adapter key) -> score record
        self._mergers: dict[tuple[str, int], Callable] = {}

    # -- stages ----------------------------------------------------------------------------------
    def _setup(self, report_only: bool = False) -> None:
        from romscale.adapters.library import library_fingerprint, load_library
        from romscale.adapters.train import LoraTrainConfig, train_task_adapters
        from romscale.data.taskbank import TaskBank

        self.bank = TaskBank.open(self.bank_dir, self.cfg.tasks)
        self.tasks = self.bank.tasks
        self.names = self.bank.names
        self.train_cfg = build(LoraTrainConfig, dict(self.cfg.train), "config", prefix="train")
        from romscale.adapters.clusterers import get_clusterer
        from romscale.adapters.d2c import D2CConfig
        from romscale.adapters.merge import get_merge_method

        self.points = plan(self.cfg, len(self.names))  # K > N and the like fail here, before training
        for c in self.cfg.clusterers:
            get_clusterer(c)
        for m in (self.cfg.merge, *self.cfg.single_merges):
            get_merge_method(m)
        build(D2CConfig, {**dict(self.cfg.d2c), "k": 1}, "config", prefix="d2c")
        t0 = time.perf_counter()
        if report_only:
            from romscale.adapters.library import finished_adapter

            lib = self.out / "lib"
            runs = {t: finished_adapter(lib, t) for t in self.names}
            if None in runs.values():
                raise RomscaleError(f"--report-only: {lib} has no adapters yet for {[t for t, r in runs.items() if r is None][:5]}")
            self.train_record = {"library": str(lib), "trained": [], "skipped": list(self.names), "runs": runs}
        else:
            self.train_record = train_task_adapters(self.bank, self.cfg.base, self.out / "lib", self.train_cfg,
                                                    tasks=self.names, progress=self.progress, log=self.log, shard=self.shard)
        if self.shard is not None:
            self._wait_for_adapters()
        self.train_seconds = round(time.perf_counter() - t0, 1)
        self.library = load_library(self.out / "lib", tasks=self.names)
        self.lib_storage = self.library.storage()
        self.lib_sha256 = library_fingerprint(self.out / "lib", self.names)
        self._reused = {} if self.reuse is None else self._reusable(self.reuse)
        self._model = None

    # what a point's scores depend on besides the library and the point itself
    _SCORING_FIELDS = ("split", "limit", "batch_size", "eval_bf16", "merge", "density", "d2c", "train")

    def _reusable(self, file: Path) -> dict[str, dict[str, Any]]:
        """The points of an earlier results file that this run may take as its own: same tasks, same
        scoring options, and the same library: equal fingerprints (bit-identical adapters) or, for a
        file written before fingerprints were recorded, every task's training record reproduced (its
        config and every step's loss to the recorded 5 decimals; one flipped bit early in training
        shows in the later losses). Anything else is logged and nothing is reused."""
        doc = read_json(file, RomscaleError)
        if not isinstance(doc, dict) or doc.get("romscale_output") != RESULT_KIND:
            raise RomscaleError(f"--reuse {file}: expected a results JSON of romscale adapters benchmark")

        def refuse(why: str) -> dict[str, dict[str, Any]]:
            self.log(f"--reuse {file}: nothing reused: {why}")
            return {}

        if [t.get("name") for t in doc.get("tasks", [])] != list(self.names):
            return refuse("its tasks differ from this run's")
        mine, theirs = to_plain(self.cfg), doc.get("config", {})
        changed = [k for k in self._SCORING_FIELDS if mine.get(k) != theirs.get(k)]
        if changed:
            return refuse(f"its config differs in {changed}")
        sha = doc.get("library", {}).get("sha256")
        if sha is not None and sha != self.lib_sha256:
            return refuse("its library's fingerprint differs (the adapters are not bit-identical)")
        if sha is None:
            runs, now = doc.get("training", {}).get("record", {}).get("runs", {}), self.train_record["runs"]
            for t in self.names:
                a, b = runs.get(t) or {}, now.get(t) or {}
                if a.get("config") != b.get("config") or [round(x, 5) for x in a.get("losses", [])] != \
                        [round(x, 5) for x in b.get("losses", [])] or not b.get("losses"):
                    return refuse(f"task {t}'s retrained adapter does not reproduce its training record")
        pts = {p["id"]: p for p in doc.get("points", []) if isinstance(p, dict) and set(p.get("scores", {})) == set(self.names)}
        self.log(f"--reuse {file}: {len(pts)} point(s) reusable (library matched by "
                 f"{'fingerprint' if sha else 'training record'})")
        return pts

    def _wait_for_adapters(self, timeout_s: float = 3600.0) -> None:
        """Until every task's adapter is finished (the other shards train theirs)."""
        from romscale.adapters.library import finished_adapter

        deadline = time.monotonic() + timeout_s
        while True:
            missing = [t for t in self.names if finished_adapter(self.out / "lib", t) is None]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RomscaleError(f"--shard: the adapters of {missing[:5]} are still missing after {timeout_s:.0f} s; "
                                    "is every shard running?")
            time.sleep(2.0)

    def _evaluator(self):
        if self._model is None:
            from romscale.adapters.train import _device, load_base
            from romscale.eval.generate import TaskEvaluator
            from romscale.eval.slot import AdapterSlot

            model, tok = load_base(self.cfg.base, device=_device(self.train_cfg), progress=self.progress)
            from romscale.adapters.hydraopt import HydraOptConfig

            # HydraOpt may pick a shared rank up to max(rank_multipliers) x r: the slot holds any of them
            rank = max(self.library.max_rank(m) for m in self.library.modules)
            rank = int(round(rank * max(HydraOptConfig().rank_multipliers)))
            self.slot = AdapterSlot(model, target_modules=self.train_cfg.target_modules, rank=rank)
            self.evaluator = TaskEvaluator(model, tok, self.slot, batch_size=self.cfg.batch_size, bf16=self.cfg.eval_bf16)
            self._model = model
        return self.evaluator

    # -- scoring ---------------------------------------------------------------------------------
    def _score_assignment(self, assignment: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """task -> score record, for task -> adapter (None: no adapter): each distinct adapter is set
        once and all its tasks are generated in shared batches; scores are cached by adapter content."""
        ev = self._evaluator()
        by_key: dict[str, tuple[Any, list[str]]] = {}
        for task, adapter in assignment.items():
            key = "base" if adapter is None else _adapter_key(adapter)
            by_key.setdefault(key, (adapter, []))[1].append(task)
        for key, (adapter, tasks) in by_key.items():
            todo = [t for t in tasks if (t, key) not in self._scores]
            if todo:
                self.slot.set(adapter)
                items = [(self.bank.task(t), self.bank.task(t).examples(self.cfg.split, self.cfg.limit)) for t in todo]
                for t, r in zip(todo, ev.score_many(items)):
                    self._scores[(t, key)] = {"score": r["score"], "n": r["n"], "metric": r["metric"]}
        return {t: self._scores[(t, "base" if a is None else _adapter_key(a))] for t, a in assignment.items()}

    def _merger(self, method: str | None = None, seed: int = 0):
        """merge(members) with the run's merge options (TIES by default; a one-task cluster keeps its
        own adapter), cached by member set: D2C, the clusterers and the scoring share merges."""
        from romscale.adapters.clusterers import cluster_merger
        from romscale.adapters.merge import MergeOptions, get_merge_method
        from romscale.adapters.train import _device

        method = method or self.cfg.merge
        # The seed enters only random merges (DARE): the seeds of a deterministic one share one merger
        # and its caches (the incremental TIES sums hold gigabytes on a real model's library).
        key = (method, seed if get_merge_method(method).random else 0)
        if key not in self._mergers:
            dev = _device(self.train_cfg)  # merge where the model runs: on a GPU host the CPU merge was D2C's bottleneck
            options = MergeOptions(density=self.cfg.density, seed=seed, device=None if dev.type == "cpu" else str(dev))
            inner = cluster_merger(self.library, key[0], options)
            cache: dict[tuple[str, ...], Any] = {}

            def merge(members: tuple[str, ...]):
                k = tuple(sorted(members))
                if k not in cache:
                    cache[k] = inner(k)
                return cache[k]

            self._mergers[key] = merge
        return self._mergers[key]

    def _merge(self, members: tuple[str, ...], method: str | None = None, seed: int = 0):
        return self._merger(method, seed)(members)

    def _storage(self, tensors_bytes: int, params: int) -> dict[str, Any]:
        lib = self.lib_storage
        return {"bytes": int(tensors_bytes), "params": int(params), "dtype": lib.total.dtype,
                "fraction_bytes": tensors_bytes / lib.bytes, "fraction_params": params / lib.params}

    @staticmethod
    def _adapter_size(adapter) -> tuple[int, int]:
        b = p = 0
        for lm in adapter.modules.values():
            for t in (lm.A, lm.B):
                b += t.numel() * t.element_size()
                p += t.numel()
        return b, p

    def _cluster_problem(self, seed: int):
        from romscale.adapters.clusterers import ClusterProblem
        from romscale.adapters.taskloss import model_loss

        n = int(dict(self.cfg.d2c).get("n", 10))
        return ClusterProblem(
            bank=self.library,
            families={t.name: t.family for t in self.tasks},
            languages={t.name: t.language for t in self.tasks},
            merge=self._merger(seed=seed),
            loss=model_loss(self._evaluator(), self.bank, n=n, mode="factored", tasks=self.names),
        )

    def _partition(self, clusterer: str, k: int, seed: int) -> tuple[dict[str, int], dict[str, Any]]:
        from romscale.adapters.clusterers import get_clusterer
        from romscale.adapters.d2c import D2CConfig

        name, _, accept = clusterer.partition("-")
        options: dict[str, Any] = {}
        if name == "d2c":
            base = dict(self.cfg.d2c)
            base.update(accept=accept, merge=self.cfg.merge)
            options["config"] = build(D2CConfig, {**base, "k": k, "seed": seed}, "config", prefix="d2c")
            options["state"] = self.out / "points" / f"d2c-{accept}_k{k}_s{seed}.state.json"
            options["progress"] = self.progress
        elif name == "random":
            pass
        t0 = time.perf_counter()
        part = get_clusterer(name).cluster(self._cluster_problem(seed), k, seed, **options)
        info = {"seconds": round(time.perf_counter() - t0, 2), **(part.info or {})}
        info.pop("history", None)  # the full move history stays in the D2C state file
        return dict(part.assignment), info

    def _d2c_partition(self, k: int, seed: int) -> tuple[dict[str, int], dict[str, Any]]:
        """D2C-moved's clusters for D2C x HydraOpt: from that point's record when it is done or
        reused (an earlier run's search is not repeated), else from the search (resumed from its
        state file when there is one)."""
        pid = Point("cluster/d2c-moved", k=k, seed=seed).id
        file = self.out / "points" / f"{pid}.json"
        rec = read_json(file, RomscaleError) if file.exists() else self._reused.get(pid)
        part = (rec or {}).get("partition")
        if isinstance(part, dict) and set(part) == set(self.names) and all(isinstance(c, int) for c in part.values()):
            return dict(part), {"from_point": pid}
        return self._partition("d2c-moved", k, seed)

    # -- points ----------------------------------------------------------------------------------
    def _compute(self, p: Point) -> dict[str, Any]:
        lib = self.library
        extra: dict[str, Any] = {}
        if p.method == "zero_shot":
            assignment = {t: None for t in self.names}
            storage = self._storage(0, 0)
        elif p.method == "individual":
            assignment = {t: lib.adapters[lib.index(t)] for t in self.names}
            storage = self._storage(lib.storage().bytes, lib.storage().params)
        elif p.method.startswith("merge/"):
            merged = self._merge(tuple(self.names), p.method.split("/", 1)[1], seed=p.seed)
            assignment = {t: merged for t in self.names}
            storage = self._storage(*self._adapter_size(merged))
        elif p.method == "hydraopt":
            bundle = self._hydraopt(p.fraction)
            assignment = {t: bundle.task_adapter(t) for t in self.names}
            st = bundle.storage()
            storage = self._storage(st.bytes, st.params)
            extra["hydraopt"] = {k: v for k, v in bundle.summary().items() if k in ("k_a", "k_b", "ranks", "objective")}
        elif p.method.startswith("cluster/"):
            part, info = self._partition(p.method.split("/", 1)[1], p.k, p.seed)
            clusters = sorted(set(part.values()))
            merged = {c: self._merge(tuple(t for t in self.names if part[t] == c), seed=p.seed) for c in clusters}
            assignment = {t: merged[part[t]] for t in self.names}
            sizes = [self._adapter_size(m) for m in merged.values()]
            storage = self._storage(sum(s[0] for s in sizes), sum(s[1] for s in sizes))
            extra["partition"] = part
            extra["clustering"] = info
        elif p.method == "d2c_hydraopt":
            part, info = self._d2c_partition(p.k, p.seed)
            bundle = self._hydraopt_grouped(part, p.k)
            assignment = {t: bundle.task_adapter(t) for t in self.names}
            st = bundle.storage()
            storage = self._storage(st.bytes, st.params)
            extra["partition"] = part
            extra["clustering"] = info
        else:
            raise RomscaleError(f"unknown benchmark method {p.method!r}")
        t0 = time.perf_counter()
        scores = self._score_assignment(assignment)
        mean = sum(s["score"] for s in scores.values()) / len(scores)
        return {"id": p.id, "method": p.method, "k": p.k, "fraction": p.fraction, "seed": p.seed,
                "storage": storage, "scores": scores, "mean_score": mean,
                "eval_seconds": round(time.perf_counter() - t0, 1), **extra}

    def _hydraopt(self, fraction: float):
        from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt

        return fit_hydraopt(self.library, HydraOptConfig(storage=fraction))

    def _hydraopt_grouped(self, partition: dict[str, int], k: int):
        """HydraOpt with its B groups = D2C's clusters and K_A = K: exactly the bytes of K merged
        rank-r LoRAs, so it is compared with D2C + TIES at the same storage."""
        from romscale.adapters.hydraopt import fit_hydraopt_grouped

        return fit_hydraopt_grouped(self.library, [partition[t] for t in self.library.names])

    def run(self, max_seconds: float | None = None, report_only: bool = False) -> dict[str, Any]:
        """Compute (or reuse) every point; with `max_seconds`, no new point starts after that much
        wall time and the results list the points still missing (a rerun resumes them).
        `report_only`: train and compute nothing, report the points already done (while shards run)."""
        start = time.perf_counter()
        self._setup(report_only)
        points = self.points
        if self.shard is not None:
            points = shard_points(points, *self.shard, skip=frozenset(self._reused))
        done: list[dict[str, Any]] = []
        missing: list[str] = []
        for i, p in enumerate(points):
            file = self.out / "points" / f"{p.id}.json"
            if file.exists():
                rec = read_json(file, RomscaleError)
                if rec.get("romscale_output") == POINT_KIND and set(rec.get("scores", {})) == set(self.names):
                    done.append(rec)
                    continue
            if p.id in self._reused:
                rec = {k: v for k, v in self._reused[p.id].items() if k != "romscale_output"}
                rec["reused_from"] = str(self.reuse)
                write_json_output(file, rec, kind=POINT_KIND, overwrite=True)
                self.log(f"[{i + 1}/{len(points)}] {p.id}: mean score {rec['mean_score']:.2f}, reused from {self.reuse}")
                done.append(rec)
                continue
            if report_only or (max_seconds is not None and time.perf_counter() - start > max_seconds):
                missing.append(p.id)
                continue
            t0 = time.perf_counter()
            rec = self._compute(p)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            write_json_output(file, rec, kind=POINT_KIND, overwrite=True)
            self.log(f"[{i + 1}/{len(points)}] {p.id}: mean score {rec['mean_score']:.2f} "
                     f"at {100 * rec['storage']['fraction_bytes']:.1f}% of the library's bytes ({rec['seconds']} s)")
            done.append(rec)
        return self.results(done, missing)

    def results(self, points: list[dict[str, Any]], missing: list[str] | None = None) -> dict[str, Any]:
        from romscale.bench.adapters_report import summarise, targets
        from romscale.utils.machine import machine_line

        summary = summarise(points)
        return {
            "config": to_plain(self.cfg),
            "machine": machine_line(),
            "tasks": [{"name": t.name, "family": t.family, "language": t.language, "metric": t.metric} for t in self.tasks],
            "library": {"adapters": len(self.names), "bytes": self.lib_storage.bytes, "params": self.lib_storage.params,
                        "dtype": self.lib_storage.total.dtype, "sha256": self.lib_sha256},
            "training": {"seconds": self.train_seconds, "record": self.train_record},
            "points": points,
            "summary": summary,
            "targets": targets(summary),
            "missing": list(missing or []),
        }


def load_points(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted((folder / "points").glob("*.json")):
        rec = read_json(f, RomscaleError)
        if isinstance(rec, dict) and rec.get("romscale_output") == POINT_KIND:
            out.append(rec)
    return out


__all__ = ["AdapterBenchmarkConfig", "AdapterBenchmark", "Point", "plan", "shard_points", "load_points"]
