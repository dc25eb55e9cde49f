"""Task clusterers: N task LoRAs -> K groups, each merged into one adapter (D2C and its baselines).

A registry like merge.py: `CLUSTERERS` maps a name to a `Clusterer` whose `cluster(problem, k,
seed, **options)` returns a `Partition` (task -> cluster 0..K-1, every cluster non-empty, clusters
numbered by their first task in bank order, so results compare across methods and seeds).

- random: balanced random partition (sizes differ by at most one); D2C's starting point.
- kmeans: scikit-learn KMeans on the flattened LoRA factors.
- kmeans_svd: MBC-style: sparsify by magnitude, TruncatedSVD, L2-normalise, k-means (on unit
  vectors Euclidean k-means is k-means by cosine distance: |u - v|^2 = 2 - 2 cos).
- oracle_family / oracle_language: one cluster per label (task family / language).
- d2c: data-driven hill climbing with the merge in the loop (romscale/adapters/d2c.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from romscale.adapters.bank import AdapterBank
from romscale.adapters.peft_io import LoraAdapter
from romscale.errors import RomscaleError

MergeFn = Callable[[tuple[str, ...]], LoraAdapter]
LossFn = Callable[[list[str], LoraAdapter], list[float]]


class Partition(Mapping):
    """task -> cluster index in 0..k-1, every cluster non-empty; `info` holds what the method
    reports (JSON-able); `adapters` the final merged adapters when the method already has them."""

    def __init__(self, assignment: Mapping[str, int], k: int, info: dict[str, Any] | None = None,
                 adapters: dict[int, LoraAdapter] | None = None) -> None:
        self._a = {t: int(c) for t, c in assignment.items()}
        self.k = int(k)
        used = set(self._a.values())
        if used != set(range(self.k)):
            raise RomscaleError(f"a partition into {self.k} clusters must use every index 0..{self.k - 1} (got {sorted(used)})")
        self.info: dict[str, Any] = dict(info or {})
        self.adapters = adapters

    @property
    def assignment(self) -> dict[str, int]:
        """task -> cluster, as a plain dict (a copy)."""
        return dict(self._a)

    def __getitem__(self, task: str) -> int:
        return self._a[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._a)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"Partition(k={self.k}, {self.clusters()})"

    def clusters(self) -> list[tuple[str, ...]]:
        """Members of each cluster, in task order."""
        return [tuple(t for t, c in self._a.items() if c == i) for i in range(self.k)]

    def sizes(self) -> list[int]:
        return [len(m) for m in self.clusters()]


def canonical(tasks: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """Renumber labels by first appearance in `tasks` order (equal groupings get equal numbers)."""
    seen: dict[int, int] = {}
    return {t: seen.setdefault(int(lab), len(seen)) for t, lab in zip(tasks, labels)}


@dataclass
class ClusterProblem:
    """What a clusterer may use: the task LoRAs (adapter names are task names), task labels, and for
    data-driven methods the merge of a member set and the loss of tasks under an adapter."""

    bank: AdapterBank
    families: dict[str, str] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)
    merge: MergeFn | None = None
    loss: LossFn | None = None  # loss(tasks, adapter) -> mean target-token CE per task on its n examples

    @property
    def tasks(self) -> list[str]:
        return self.bank.names


class Clusterer(ABC):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # ClusterProblem fields that must be set: "families", "merge", ...
    description: ClassVar[str] = ""

    def cluster(self, problem: ClusterProblem, k: int, seed: int = 0, **options: Any) -> Partition:
        """Partition the problem's tasks into exactly k non-empty clusters."""
        n = len(problem.tasks)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
            raise RomscaleError(f"the number of clusters K must be in 1..{n} (the number of tasks); got {k!r}")
        for need in self.needs:
            value = getattr(problem, need)
            if not value:
                raise RomscaleError(f"clusterer {self.name!r} needs the problem's {need}")
            if need in ("families", "languages"):
                missing = [t for t in problem.tasks if t not in value]
                if missing:
                    what = "family" if need == "families" else "language"
                    raise RomscaleError(f"clusterer {self.name!r}: no {what} for tasks {missing[:4]}")
        part = self._cluster(problem, int(k), int(seed), **options)
        if list(part) != list(problem.tasks) or part.k != k:
            raise RomscaleError(f"internal: clusterer {self.name!r} returned a partition of the wrong shape")
        return part

    @abstractmethod
    def _cluster(self, problem: ClusterProblem, k: int, seed: int, **options: Any) -> Partition: ...


CLUSTERERS: dict[str, Clusterer] = {}


def register_clusterer(cls: type[Clusterer]) -> type[Clusterer]:
    if cls.name in CLUSTERERS:
        raise RomscaleError(f"clusterer {cls.name!r} registered twice")
    CLUSTERERS[cls.name] = cls()
    return cls


def get_clusterer(name: str) -> Clusterer:
    try:
        return CLUSTERERS[name]
    except KeyError:
        raise RomscaleError(f"unknown clusterer {name!r}; available: {sorted(CLUSTERERS)}") from None


# ---- helpers ------------------------------------------------------------------------------------
def random_balanced(tasks: Sequence[str], k: int, rng: np.random.Generator) -> dict[str, int]:
    """A uniformly random partition with sizes floor(N/K) or ceil(N/K)."""
    order = rng.permutation(len(tasks))
    labels = np.empty(len(tasks), dtype=np.int64)
    labels[order] = np.arange(len(tasks)) % k
    return canonical(tasks, labels)


def fill_empty(labels: np.ndarray, k: int, dist: np.ndarray) -> np.ndarray:
    """Give every empty cluster one member: the point farthest from its centre, taken from a cluster
    of >= 2 (k-means can end with fewer distinct clusters when points coincide). dist: (N, k)."""
    labels = labels.copy()
    for c in range(k):
        if (labels == c).any():
            continue
        counts = np.bincount(labels, minlength=k)
        movable = np.flatnonzero(counts[labels] >= 2)
        own = dist[movable, labels[movable]]
        labels[movable[int(np.argmax(own))]] = c
    return labels


def flat_factors(bank: AdapterBank) -> np.ndarray:
    """(N, D) float32: every module's A and scaling-folded B, zero-padded to the module's max rank."""
    parts = []
    for mod in bank.modules:
        A, B = bank.stack(mod).padded(dtype=torch.float32)
        parts.append(A.reshape(bank.n, -1).numpy())
        parts.append(B.reshape(bank.n, -1).numpy())
    return np.concatenate(parts, axis=1)


def _kmeans(X: np.ndarray, k: int, seed: int, n_init: int) -> tuple[np.ndarray, int]:
    """k-means labels with every cluster non-empty, and how many clusters had to be refilled."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    # N is tens of points: threads only add spin-waits (a 12-point fit: 0.51 s with the default
    # OpenMP threads, 0.03 s with one, on the shared 2-core CPU)
    with warnings.catch_warnings(), threadpool_limits(1):  # "fewer distinct clusters than n_clusters": fill_empty handles it
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(X)
    filled = fill_empty(labels, k, km.transform(X))
    return filled, int(k - len(set(labels.tolist())))


# ---- the registry -------------------------------------------------------------------------------
@register_clusterer
class RandomClusterer(Clusterer):
    name = "random"
    description = "balanced random partition (sizes differ by at most one)"

    def _cluster(self, problem, k, seed, **options):
        _no_options(self.name, options)
        return Partition(random_balanced(problem.tasks, k, np.random.default_rng(seed)), k, {"method": self.name, "seed": seed})


@register_clusterer
class KMeansClusterer(Clusterer):
    name = "kmeans"
    description = "k-means (scikit-learn) on the flattened LoRA factors (A and scaled B)"

    def _cluster(self, problem, k, seed, n_init: int = 10, **options):
        _no_options(self.name, options)
        X = flat_factors(problem.bank)
        labels, refilled = _kmeans(X, k, seed, n_init)
        info = {"method": self.name, "seed": seed, "n_init": n_init, "features": int(X.shape[1]), "refilled_clusters": refilled}
        return Partition(canonical(problem.tasks, labels), k, info)


@register_clusterer
class KMeansSVDClusterer(Clusterer):
    name = "kmeans_svd"
    description = "MBC-style: keep the largest-magnitude weights, TruncatedSVD, L2-normalise, k-means by cosine"

    def _cluster(self, problem, k, seed, keep: float = 0.1, components: int = 32, n_init: int = 10, **options):
        _no_options(self.name, options)
        if not 0.0 < keep <= 1.0:
            raise RomscaleError(f"kmeans_svd: keep must be in (0, 1], got {keep}")
        import scipy.sparse
        from sklearn.decomposition import TruncatedSVD
        from sklearn.preprocessing import normalize
        from threadpoolctl import threadpool_limits

        X = flat_factors(problem.bank)
        n, d = X.shape
        # Sparsify each task's vector: keep its `keep` fraction of largest magnitudes.
        m = max(1, round(keep * d))
        idx = np.argpartition(-np.abs(X), m - 1, axis=1)[:, :m]
        rows = np.repeat(np.arange(n), m)
        S = scipy.sparse.csr_matrix((X[rows, idx.ravel()], (rows, idx.ravel())), shape=(n, d))
        c = max(1, min(components, n - 1, d - 1))
        with threadpool_limits(1):  # tens of rows: see _kmeans
            Z = TruncatedSVD(n_components=c, random_state=seed).fit_transform(S) if n > 1 else np.ones((1, 1))
        Z = normalize(Z)
        labels, refilled = _kmeans(Z, k, seed, n_init)
        info = {"method": self.name, "seed": seed, "keep": keep, "components": c, "n_init": n_init, "refilled_clusters": refilled}
        return Partition(canonical(problem.tasks, labels), k, info)


class _OracleClusterer(Clusterer):
    """Tasks grouped by a label. With more labels than K, label groups are packed into K clusters
    (largest first into the smallest cluster: no label is split); with fewer, the largest clusters
    are split in two (alternate members) until there are K."""

    label: ClassVar[str]

    def _cluster(self, problem, k, seed, **options):
        _no_options(self.name, options)
        labels = getattr(problem, self.label)
        groups: dict[str, list[str]] = {}
        for t in problem.tasks:
            groups.setdefault(labels[t], []).append(t)
        clusters = [groups[g] for g in sorted(groups)]
        if len(clusters) > k:
            bins: list[list[str]] = [[] for _ in range(k)]
            for g in sorted(clusters, key=lambda g: (-len(g), problem.tasks.index(g[0]))):
                min(bins, key=len).extend(g)
            clusters = bins
        while len(clusters) < k:
            big = max(range(len(clusters)), key=lambda i: len(clusters[i]))
            g = clusters.pop(big)
            clusters += [g[0::2], g[1::2]]
        assign = {t: i for i, members in enumerate(clusters) for t in members}
        part = canonical(problem.tasks, [assign[t] for t in problem.tasks])
        return Partition(part, k, {"method": self.name, "labels": len(groups)})


@register_clusterer
class OracleFamily(_OracleClusterer):
    name, label, needs = "oracle_family", "families", ("families",)
    description = "one cluster per task family (problem type)"


@register_clusterer
class OracleLanguage(_OracleClusterer):
    name, label, needs = "oracle_language", "languages", ("languages",)
    description = "one cluster per language"


@register_clusterer
class D2CClusterer(Clusterer):
    name = "d2c"
    needs = ("merge", "loss")
    description = "D2C: hill climbing over partitions, a move kept only when the merged adapter's loss drops"

    def _cluster(self, problem, k, seed, **options):
        from romscale.adapters.d2c import D2CConfig, run_d2c

        state = options.pop("state", None)
        progress = bool(options.pop("progress", False))
        cfg = options.pop("config", None)  # a whole D2CConfig, or its fields as options
        if cfg is not None:
            if options:
                raise RomscaleError(f"d2c: give either config or D2CConfig fields, not both ({sorted(options)})")
            if not isinstance(cfg, D2CConfig) or cfg.k != k or cfg.seed != seed:
                raise RomscaleError(f"d2c: config must be a D2CConfig with k={k} and seed={seed}; got {cfg!r}")
        else:
            try:
                cfg = D2CConfig(k=k, seed=seed, **options)
            except TypeError as exc:
                raise RomscaleError(f"d2c: {exc}") from None
        res = run_d2c(problem, cfg, state=state, progress=progress)
        return Partition(res.partition, k, res.summary(), adapters=res.adapters)


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise RomscaleError(f"clusterer {name!r} takes no options {sorted(options)}")


# ---- merging a cluster --------------------------------------------------------------------------
def cluster_merger(bank: AdapterBank, method: str = "ties", options: Any = None, *, singleton: str = "identity",
                   incremental: bool = True) -> MergeFn:
    """merge(members) -> the merged LoRA of those tasks with a romscale.adapters.merge method.
    A one-task cluster keeps its own adapter (`singleton="identity"`, default: a merge of one is
    the adapter itself; TIES would trim it) or goes through the method (`"merge"`).
    TIES with its default weights goes through romscale.adapters.ties_sums (each task trimmed once,
    sums of member sets kept: a set one task away from a recent one is one add away) unless
    `incremental` is False (the plain merge, from the factors every time) or those would take more
    than half the free memory (a large model's library)."""
    from romscale.adapters.merge import MergeOptions, get_merge_method, merge_adapters, merge_device
    from romscale.adapters.ties_sums import IncrementalTies, available_bytes, bytes_needed

    get_merge_method(method)
    options = options or MergeOptions()
    if singleton not in ("identity", "merge"):
        raise RomscaleError(f"singleton must be 'identity' or 'merge', got {singleton!r}")
    fast = None
    if incremental and method == "ties" and options.weights is None:
        if bytes_needed(bank, cache_size=8) <= available_bytes(merge_device(options)) // 2:
            fast = IncrementalTies(bank, options, cache_size=8)

    def merge(members: tuple[str, ...]) -> LoraAdapter:
        if not members:
            raise RomscaleError("cannot merge an empty cluster")
        idx = sorted(bank.index(t) for t in members)
        if len(idx) == 1 and singleton == "identity":
            return bank.adapters[idx[0]]
        if fast is not None:
            return fast.merge([bank.names[i] for i in idx])
        sub = AdapterBank([bank.adapters[i] for i in idx], allow_base_mismatch=True, module_order=bank.modules)  # checked as a whole already
        return merge_adapters(sub, method, options, name="+".join(bank.names[i] for i in idx)).adapter

    return merge
