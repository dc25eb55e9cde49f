"""HydraOpt (our reading of Ceritli et al., EMNLP 2025; see docs/adapters.md): store K_A shared
down-projections A~ and K_B shared up-projections B~ per module; task t uses B~_{k(t)} A~_{g(t)}.

Fit objective per module: sum_t w_t ||dW_t - B~_{k(t)} A~_{g(t)}||^2 / ||dW_t||^2 (optionally in a
data-aware metric, see `als_refine`). Everything runs in factored form (r x r and r x d Grams).

Closed forms. When the B groups are nested inside the A groups ("a" tree: tasks -> A group -> B
sub-group), each A group is an independent problem whose optimum is exact: with C_k the summed
weights and M_k the weighted mean update of sub-group k, A~ spans the top-rho right singular
subspace of the stacked sqrt(C_k) M_k and B~_k = M_k A~^T; the error is sum_t w_t minus the top-rho
eigenvalues. One shared A with per-task B is the special case K_A = 1, K_B = N. The "b" tree
(A groups nested in B groups) is the same on the transposed problem. Crossed groupings and the
data-aware metric use alternating least squares from that start.

Storage target. For a target fraction f of the library's bytes (or of its parameters, with
storage_unit="params"; the shared factors' dtype converts one into the other) we evaluate, per structure
(a/b tree; "auto" picks the side whose factors are more alike) and shared rank rho in
`rank_multipliers` x r, every K of a fixed ladder with the other K as large as f allows, plus the
budget-filling per-task point, and keep the least total error. Groupings are cuts of Ward
dendrograms (nested), so for a larger f each candidate is refined by another: the chosen error
never increases with f (up to rounding; search spectra of large matrices are float32, ~1e-7).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from romscale.errors import RomscaleError
from romscale.adapters.bank import AdapterBank
from romscale.adapters.cluster import Dendrogram, groups_of, input_side_kernel, ward_dendrogram
from romscale.adapters.factors import complete_rows, inner, psd_sqrt_factor, sq_norm, top_eigh, top_eigvals
from romscale.adapters.parallel import map_modules
from romscale.adapters.storage import StorageReport, dtype_name, itemsize, torch_dtype

Tree = Literal["a", "b"]
F64 = torch.float64
SPECTRUM_F32_MIN_DIM = 256  # search spectra of matrices at least this large are computed in float32


@dataclass(frozen=True)
class HydraOptConfig:
    storage: float | None = 0.5  # target fraction of the library's storage (ignored if k_a/k_b given)
    storage_unit: Literal["bytes", "params"] = "bytes"  # what `storage` is a fraction of
    k_a: int | None = None  # explicit number of shared A per module
    k_b: int | None = None  # explicit number of shared B per module
    rank: int | None = None  # explicit shared rank rho (default: max input rank of the module)
    rank_multipliers: tuple[float, ...] = (1.0, 1.5, 2.0)  # rho = round(m * r) candidates for a storage target
    ladder: tuple[int, ...] | None = None  # K values tried for a storage target (default 1, 2, 4, ..., N)
    structures: tuple[Tree, ...] | Literal["auto"] = "auto"  # "auto": share the more similar side
    grouping: Literal["nested", "independent"] = "nested"  # explicit mode: nested (closed form) or crossed (ALS)
    task_weights: Sequence[float] | None = None
    data_weight: float = 0.0  # lambda of the data-aware metric (needs inputs)
    als_iters: int = 30
    als_tol: float = 1e-7
    factor_dtype: str | None = None  # dtype of the stored shared factors; None: the inputs' dtype
    # Explicit mode: fixed B groups, a label per task in bank order (e.g. D2C's partition) instead of
    # Ward cuts; the A groups are one (K_A = 1), the B groups themselves (K_A = K_B) or Ward
    # refinements of them (K_A > K_B). Storage depends only on K_A, K_B and the rank.
    b_groups: Sequence[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task_weights"] = list(self.task_weights) if self.task_weights is not None else None
        d["b_groups"] = [int(x) for x in self.b_groups] if self.b_groups is not None else None
        d["structures"] = self.structures if isinstance(self.structures, str) else list(self.structures)
        return d


@dataclass(frozen=True)
class Candidate:
    tree: Tree
    rank_multiplier: float | None  # None: explicit rank
    k_a: int
    k_b: int
    params: int


# ---- one module's problem -----------------------------------------------------------------------
class ModuleProblem:
    """Tasks' factors of one module in float64 (B scaled), weights c_t = w_t / ||dW_t||^2."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, w: torch.Tensor, kmax: int | None = None) -> None:
        self.A, self.B, self.w = A, B, w  # (N, r, d_in), (N, d_out, r), (N,)
        self.norm = sq_norm(B, A)
        self.c = torch.where(self.norm > 0, w / self.norm.clamp_min(1e-300), torch.zeros_like(w))
        self._Z: torch.Tensor | None = None
        self._R: torch.Tensor | None = None
        self._T: "ModuleProblem | None" = None
        self.kmax = kmax
        self.cache: dict[tuple, torch.Tensor] = {}

    @property
    def n(self) -> int:
        return int(self.A.shape[0])

    @property
    def Z(self) -> torch.Tensor:
        """Z_t = R_t A_t with B_t = Q_t R_t, so Z_t^T Z_t = dW_t^T dW_t."""
        if self._Z is None:
            self._Z = self.R @ self.A
        return self._Z

    def transposed(self) -> "ModuleProblem":
        if self._T is None:
            self._T = ModuleProblem(self.B.transpose(1, 2), self.A.transpose(1, 2), self.w, self.kmax)
        return self._T

    # -- closed form for one group -------------------------------------------------------------
    # A sub-group k of tasks contributes rows L_k^T A_k to W (W^T W = sum_k C_k M_k^T M_k), with
    # L_k L_k^T = H_k = B_k^T B_k / C_k for B_k = [c_t B_t]_(t in k); for one task, L^T = sqrt(c) R
    # with B = Q R. The spectrum comes from the smaller of W W^T and W^T W.
    def _left(self, ts: Sequence[int]) -> torch.Tensor:
        if len(ts) == 1:
            return self.R[ts[0]] * self.c[ts[0]].sqrt()
        c = self.c[list(ts)]
        Ck = float(c.sum())
        if Ck <= 0:
            return torch.zeros(0, len(ts) * self.A.shape[1], dtype=F64)
        Bk = torch.cat([self.B[t] * self.c[t] for t in ts], dim=1)
        H = Bk.T @ Bk / Ck
        L, info = torch.linalg.cholesky_ex(H + 1e-14 * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=F64))
        return (L if int(info) == 0 else psd_sqrt_factor(H)).T

    @property
    def R(self) -> torch.Tensor:
        if self._R is None:
            self._R = torch.linalg.qr(self.B, mode="r").R
        return self._R

    def _group_rows(self, subgroups: Sequence[Sequence[int]]) -> torch.Tensor:
        """W with W^T W = sum_k C_k M_k^T M_k over the sub-groups of one group."""
        d = self.A.shape[2]
        single = [int(ts[0]) for ts in subgroups if len(ts) == 1]
        rows = [(self.Z[single] * self.c[single].sqrt().view(-1, 1, 1)).reshape(-1, d)] if single else []
        rows += [self._left(ts) @ self.A[list(ts)].reshape(-1, d) for ts in subgroups if len(ts) > 1]
        return torch.cat(rows, dim=0) if rows else torch.zeros(0, d, dtype=F64)

    def group_spectrum(self, subgroups: Sequence[Sequence[int]]) -> torch.Tensor:
        """The top `self.kmax` eigenvalues (descending) of sum_k C_k M_k^T M_k, cached by grouping."""
        key = tuple(tuple(int(t) for t in ts) for ts in subgroups)
        hit = self.cache.get(key)
        if hit is None:
            W = self._group_rows(subgroups)
            if min(W.shape) >= SPECTRUM_F32_MIN_DIM:
                # The search's dominant cost. float32 Gram + eigvalsh is ~2x faster; its error on
                # the objective is ~1e-7 relative (measured), far below any difference it ranks.
                W = W.float()
            G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
            hit = self.cache[key] = top_eigvals(G, self.kmax).double()
        return hit

    def tree_objective(self, g: np.ndarray, k: np.ndarray, rho: int) -> float:
        """Optimal sum_t w_t e_t^2 for nested groupings (k inside g) at shared rank rho."""
        total = float(self.w[self.norm > 0].sum())
        for tasks in groups_of(g):
            subs = [tasks[k[tasks] == s] for s in np.unique(k[tasks])]
            total -= float(self.group_spectrum(subs)[:rho].sum())
        return max(total, 0.0)

    def tree_factors(self, g: np.ndarray, k: np.ndarray, rho: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared factors of the closed form: (A~ (K_A, rho, d_in), B~ (K_B, d_out, rho))."""
        d_in, d_out = self.A.shape[2], self.B.shape[1]
        KA, KB = int(g.max()) + 1, int(k.max()) + 1
        At = torch.zeros(KA, rho, d_in, dtype=F64)
        Bt = torch.zeros(KB, d_out, rho, dtype=F64)
        for gi, tasks in enumerate(groups_of(g)):
            subs = [tasks[k[tasks] == s] for s in np.unique(k[tasks])]
            W = self._group_rows(subs)
            if W.shape[0] > W.shape[1]:
                _, V = top_eigh(W.T @ W, rho)
                basis = V.T
            else:
                vals, U = top_eigh(W @ W.T, rho)
                ok = vals > vals[:1].clamp_min(0) * 1e-12 if vals.numel() else vals > 0
                basis = (U[:, ok].T @ W) / vals[ok].sqrt().unsqueeze(1)
                basis = torch.linalg.qr(basis.T).Q.T if basis.shape[0] else basis  # re-orthonormalise
            At[gi] = complete_rows(basis, rho)
            for ts in subs:
                idx = torch.as_tensor(ts)
                c = self.c[idx]
                Ck = float(c.sum())
                if Ck <= 0:
                    continue
                proj = self.A[idx] @ At[gi].T  # (|k|, r, rho)
                Bt[int(k[ts[0]])] = torch.einsum("t,tor,trp->op", c, self.B[idx], proj) / Ck
        return At, Bt

    # -- errors --------------------------------------------------------------------------------
    def task_errors_sq(self, At: torch.Tensor, Bt: torch.Tensor, g: np.ndarray, k: np.ndarray) -> torch.Tensor:
        """Relative squared error of every task (nan where the task's update is zero)."""
        Ah, Bh = At[torch.as_tensor(g)], Bt[torch.as_tensor(k)]
        err = self.norm - 2 * inner(self.B, self.A, Bh, Ah) + sq_norm(Bh, Ah)
        return torch.where(self.norm > 0, err.clamp_min(0) / self.norm.clamp_min(1e-300), torch.full_like(err, float("nan")))


# ---- alternating least squares (crossed groupings, data-aware metric) --------------------------
def _metric_parts(P: ModuleProblem, F: Sequence[torch.Tensor | None], lam: float):
    lam_t = torch.tensor([lam if f is not None else 0.0 for f in F], dtype=F64)
    AF = [P.A[t] @ F[t].T if F[t] is not None else None for t in range(P.n)]  # (r, m_t)
    nd = torch.stack([(P.B[t] @ AF[t]).square().sum() if AF[t] is not None else P.norm[t] for t in range(P.n)])
    n_metric = (1 - lam_t) * P.norm + lam_t * nd
    c = torch.where(n_metric > 0, P.w / n_metric.clamp_min(1e-300), torch.zeros_like(P.w))
    return lam_t, AF, n_metric, c


def als_refine(
    P: ModuleProblem,
    g: np.ndarray,
    k: np.ndarray,
    At: torch.Tensor,
    Bt: torch.Tensor,
    *,
    inputs: Sequence[torch.Tensor | None] | None = None,
    data_weight: float = 0.0,
    iters: int = 30,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternate exact B and A updates of sum_t c_t ||(dW_t - B~A~) S_t^(1/2)||^2 with the metric
    S_t = (1 - lambda) I + lambda F_t^T F_t (F_t: a task's module inputs, trace-normalised to d_in;
    lambda = 0 gives the plain objective). Each half-step minimises exactly (the A step by
    preconditioned CG when lambda > 0), so the objective never increases. Returns the history."""
    F = list(inputs) if inputs is not None else [None] * P.n
    if data_weight == 0.0:
        F = [None] * P.n
    lam_t, AF, n_m, c = _metric_parts(P, F, data_weight)
    gi, ki = torch.as_tensor(g), torch.as_tensor(k)
    KA, KB, rho = At.shape[0], Bt.shape[0], At.shape[1]
    eye = torch.eye(rho, dtype=F64)

    def objective(At, Bt) -> float:
        tot = 0.0
        for t in range(P.n):
            if c[t] == 0:
                continue
            a, b = At[gi[t]], Bt[ki[t]]
            BtB = P.B[t].T @ b
            ip = (1 - lam_t[t]) * (BtB * (P.A[t] @ a.T)).sum()
            nn = (1 - lam_t[t]) * ((b.T @ b) * (a @ a.T)).sum()
            if F[t] is not None and lam_t[t] > 0:
                aF = a @ F[t].T
                ip = ip + lam_t[t] * (BtB * (AF[t] @ aF.T)).sum()
                nn = nn + lam_t[t] * (b @ aF).square().sum()
            tot += float(c[t] * (n_m[t] - 2 * ip + nn))
        return max(tot, 0.0)

    def solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        ridge = 1e-12 * float(lhs.diagonal().abs().mean().clamp_min(1e-300))
        return torch.linalg.solve(lhs + ridge * eye, rhs)

    hist = [objective(At, Bt)]
    for _ in range(iters):
        # B step: B~_k = [sum c dW S A~^T][sum c A~ S A~^T]^-1 over tasks of group k.
        Bn = Bt.clone()
        for kb in range(KB):
            ts = torch.nonzero(ki == kb).flatten().tolist()
            num = torch.zeros(P.B.shape[1], rho, dtype=F64)
            den = torch.zeros(rho, rho, dtype=F64)
            for t in ts:
                a = At[gi[t]]
                num += c[t] * (1 - lam_t[t]) * (P.B[t] @ (P.A[t] @ a.T))
                den += c[t] * (1 - lam_t[t]) * (a @ a.T)
                if F[t] is not None and lam_t[t] > 0:
                    aF = a @ F[t].T
                    num += c[t] * lam_t[t] * (P.B[t] @ (AF[t] @ aF.T))
                    den += c[t] * lam_t[t] * (aF @ aF.T)
            if float(den.abs().sum()) > 0:
                Bn[kb] = solve(den, num.T).T
        Bt = Bn
        # A step: sum_t c G_t A~ S_t = sum_t c B~^T dW_t S_t over tasks of group g.
        An = At.clone()
        for ga in range(KA):
            ts = torch.nonzero(gi == ga).flatten().tolist()
            Gs = [Bt[ki[t]].T @ Bt[ki[t]] for t in ts]
            lhs0 = sum((c[t] * G for t, G in zip(ts, Gs)), torch.zeros(rho, rho, dtype=F64))
            if float(lhs0.abs().sum()) == 0:
                continue
            rhs = torch.zeros(rho, P.A.shape[2], dtype=F64)
            for t in ts:
                base = (Bt[ki[t]].T @ P.B[t]) @ P.A[t]
                if F[t] is not None and lam_t[t] > 0:
                    base = (1 - lam_t[t]) * base + lam_t[t] * ((Bt[ki[t]].T @ P.B[t]) @ AF[t]) @ F[t]
                rhs += c[t] * base
            if all(F[t] is None or lam_t[t] == 0 for t in ts):
                An[ga] = solve(lhs0, rhs)
                continue

            def op(X: torch.Tensor) -> torch.Tensor:
                out = torch.zeros_like(X)
                for t, G in zip(ts, Gs):
                    SX = X if F[t] is None else (1 - lam_t[t]) * X + lam_t[t] * (X @ F[t].T) @ F[t]
                    out += c[t] * (G @ SX)
                return out

            X = At[ga].clone()
            R = rhs - op(X)
            Zp = solve(lhs0, R)
            Pd = Zp.clone()
            rz = float((R * Zp).sum())
            r0 = math.sqrt(float((rhs * rhs).sum())) or 1.0
            for _cg in range(100):
                if math.sqrt(float((R * R).sum())) <= 1e-11 * r0:
                    break
                AP = op(Pd)
                alpha = rz / float((Pd * AP).sum())
                X += alpha * Pd
                R -= alpha * AP
                Zp = solve(lhs0, R)
                rz_new = float((R * Zp).sum())
                Pd = Zp + (rz_new / rz) * Pd
                rz = rz_new
            An[ga] = X
        At = An
        hist.append(objective(At, Bt))
        if hist[-2] - hist[-1] <= tol * max(hist[-2], 1e-300):
            break
    return At, Bt, hist


# ---- planning and fitting ------------------------------------------------------------------------
def _module_rank(bank: AdapterBank, mod: str, mult: float | None, rank: int | None) -> int:
    d_out, d_in = bank.shapes[mod]
    r = rank if rank is not None else max(1, int(round((mult or 1.0) * bank.max_rank(mod))))
    return max(1, min(r, d_in, d_out))


def storage_params(bank: AdapterBank, k_a: int, k_b: int, mult: float | None = 1.0, rank: int | None = None) -> int:
    """Parameters of a HydraOpt bundle: sum over modules of rho (K_A d_in + K_B d_out)."""
    tot = 0
    for m, (d_out, d_in) in bank.shapes.items():
        rho = _module_rank(bank, m, mult, rank)
        tot += rho * (k_a * d_in + k_b * d_out)
    return tot


def default_ladder(n: int) -> tuple[int, ...]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return tuple(ks + [n])


def choose_structure(bank: AdapterBank, w: torch.Tensor, sample: int = 8) -> tuple[Tree, dict[str, float]]:
    """'a' (share A; B groups inside A groups) when the tasks' input sides are on average more alike
    than their output sides, else 'b'. Measured on up to `sample` evenly spaced modules; the choice
    does not depend on the budget, so the monotone-in-budget argument is unaffected."""
    mods = bank.modules
    idx = sorted({round(i * (len(mods) - 1) / max(1, sample - 1)) for i in range(min(sample, len(mods)))})
    n = bank.n
    off = ~np.eye(n, dtype=bool)
    sa, sb = [], []
    for i in idx:
        A, B = bank.stack(mods[i]).padded(F64)
        P = ModuleProblem(A, B, w)
        if n > 1:
            sa.append(float(input_side_kernel(P.Z)[off].mean()))
            sb.append(float(input_side_kernel(P.transposed().Z)[off].mean()))
    ma, mb = (float(np.mean(sa)), float(np.mean(sb))) if sa else (1.0, 1.0)
    return ("a" if ma >= mb else "b"), {"input_side_similarity": ma, "output_side_similarity": mb}


def budget_params(bank: AdapterBank, fraction: float, unit: str, dtype: torch.dtype) -> float:
    """The parameter budget of a storage fraction: of the library's params, or of its bytes with
    the shared factors stored in `dtype` (fp16 factors of an fp32 library: twice the params)."""
    lib = bank.storage()
    return fraction * lib.params if unit == "params" else fraction * lib.bytes / itemsize(dtype)


def fractions(params: int, dtype: torch.dtype, lib: StorageReport) -> dict[str, Any]:
    """Storage of `params` factors in `dtype`, absolute and as fractions of the library, both units."""
    nbytes = params * itemsize(dtype)
    return {"bytes": nbytes, "dtype": dtype_name(dtype), "storage_fraction_params": params / lib.params,
            "storage_fraction_bytes": nbytes / lib.bytes}


def plan_candidates(bank: AdapterBank, cfg: HydraOptConfig, structures: Sequence[Tree] | None = None,
                    fdtype: torch.dtype | None = None) -> list[Candidate]:
    """The frontier of (structure, rho, K_A, K_B) within the storage target: for every K of the
    ladder the other K as large as the budget allows, plus the budget-filling per-task point (a tree:
    K_B = N with the largest K_A that fits; b tree: K_A = N with the largest K_B). Each candidate at
    a budget is refined (nested groupings) by one at any larger budget, hence monotone errors."""
    N = bank.n
    fdtype = fdtype if fdtype is not None else factor_dtype(bank, cfg)
    if cfg.storage is None or not 0 < cfg.storage <= 1:
        raise RomscaleError(f"storage target must be a fraction in (0, 1], got {cfg.storage}")
    budget = budget_params(bank, cfg.storage, cfg.storage_unit, fdtype)
    ladder = sorted({min(max(1, int(k)), N) for k in (cfg.ladder or default_ladder(N))})
    out: list[Candidate] = []
    trees = structures or (("a", "b") if cfg.structures == "auto" else cfg.structures)
    for tree in trees:
        for mult in cfg.rank_multipliers:
            ua = storage_params(bank, 1, 0, mult)
            ub = storage_params(bank, 0, 1, mult)
            for kf in ladder:
                if tree == "a":
                    ka, kb = kf, min(N, int((budget - kf * ua) // ub))
                    ok = kb >= ka
                else:
                    kb, ka = kf, min(N, int((budget - kf * ub) // ua))
                    ok = ka >= kb
                if ok and ka >= 1 and kb >= 1:
                    cand = Candidate(tree, mult, ka, kb, storage_params(bank, ka, kb, mult))
                    if cand not in out:
                        out.append(cand)
            # Budget-filling point with per-task factors on the nested side.
            if tree == "a":
                ka, kb = min(N, int((budget - N * ub) // ua)), N
            else:
                ka, kb = N, min(N, int((budget - N * ua) // ub))
            if ka >= 1 and kb >= 1:
                cand = Candidate(tree, mult, ka, kb, storage_params(bank, ka, kb, mult))
                if cand not in out:
                    out.append(cand)
    if not out:
        params = min(storage_params(bank, 1, 1, m) for m in cfg.rank_multipliers)
        lib = bank.storage()
        raise RomscaleError(
            f"storage target {cfg.storage:.4g} (of the library's {cfg.storage_unit}) is below the smallest HydraOpt "
            f"configuration (one shared A and B: {params / lib.params:.4g} of its params, "
            f"{params * itemsize(fdtype) / lib.bytes:.4g} of its bytes in {dtype_name(fdtype)})"
        )
    return out


@dataclass
class _ModuleGroups:
    kA: np.ndarray  # input-side kernel (similarity of A sides)
    kB: np.ndarray  # output-side kernel (similarity of B sides)
    dA: Dendrogram
    dB: Dendrogram
    constrained: dict[tuple[Tree, int], Dendrogram] = field(default_factory=dict)


def _labels(P: ModuleProblem, mg: _ModuleGroups, tree: Tree, ka: int, kb: int, grouping: str,
            fixed_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A-group and B-group labels; nested unless grouping == 'independent'. `fixed_b`: given B
    groups (checked by _fixed_b_groups); A groups one, the same, or constrained Ward refinements."""
    if fixed_b is not None:
        if ka == 1:
            return np.zeros(P.n, dtype=np.int64), fixed_b
        if ka == kb:
            return fixed_b.copy(), fixed_b
        key = ("fixed-b", ka)
        if key not in mg.constrained:
            mg.constrained[key] = ward_dendrogram(mg.kA, constraint=fixed_b)
        return mg.constrained[key].cut(ka), fixed_b
    if grouping == "independent":
        return mg.dA.cut(ka), mg.dB.cut(kb)
    if tree == "a":
        g = mg.dA.cut(ka)
        key = ("a", ka)
        if key not in mg.constrained:
            mg.constrained[key] = ward_dendrogram(mg.kB, constraint=g)
        return g, mg.constrained[key].cut(kb)
    k = mg.dB.cut(kb)
    key = ("b", kb)
    if key not in mg.constrained:
        mg.constrained[key] = ward_dendrogram(mg.kA, constraint=k)
    return mg.constrained[key].cut(ka), k


def _problem(bank: AdapterBank, mod: str, w: torch.Tensor, kmax: int | None = None) -> tuple[ModuleProblem, _ModuleGroups]:
    A, B = bank.stack(mod).padded(F64)
    P = ModuleProblem(A, B, w, kmax)
    kA, kB = input_side_kernel(P.Z), input_side_kernel(P.transposed().Z)
    mg = _ModuleGroups(kA, kB, ward_dendrogram(kA), ward_dendrogram(kB))
    return P, mg


def _objective(P: ModuleProblem, g: np.ndarray, k: np.ndarray, tree: Tree, rho: int) -> float:
    return P.tree_objective(g, k, rho) if tree == "a" else P.transposed().tree_objective(k, g, rho)


def _factors(P: ModuleProblem, g: np.ndarray, k: np.ndarray, tree: Tree, rho: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tree == "a":
        return P.tree_factors(g, k, rho)
    Bt_T, At_T = P.transposed().tree_factors(k, g, rho)  # transposed problem: roles swap
    return At_T.transpose(1, 2).contiguous(), Bt_T.transpose(1, 2).contiguous()


def search_candidates(
    bank: AdapterBank, candidates: Sequence[Candidate], w: torch.Tensor, *, workers: int | None = None, progress: bool = False
) -> np.ndarray:
    """Sum over modules of each candidate's optimal objective (closed forms; nested groupings)."""

    def one(_i: int, mod: str) -> np.ndarray:
        P, mg = _problem(bank, mod, w, max(_module_rank(bank, mod, c.rank_multiplier, None) for c in candidates))
        out = np.zeros(len(candidates))
        for j, c in enumerate(candidates):
            g, k = _labels(P, mg, c.tree, c.k_a, c.k_b, "nested")
            out[j] = _objective(P, g, k, c.tree, _module_rank(bank, mod, c.rank_multiplier, None))
        return out

    rows = map_modules(one, bank.modules, workers=workers, desc="hydraopt search", progress=progress)
    return np.sum(rows, axis=0)


def task_weights(bank: AdapterBank, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(bank.n, dtype=F64)
    if len(weights) != bank.n or any(not (w >= 0 and math.isfinite(w)) for w in weights):
        raise RomscaleError(f"task weights must be {bank.n} finite non-negative numbers, got {list(weights)}")
    return torch.tensor([float(w) for w in weights], dtype=F64)


def factor_dtype(bank: AdapterBank, cfg: HydraOptConfig) -> torch.dtype:
    return bank.dtype if cfg.factor_dtype is None else torch_dtype(cfg.factor_dtype, "factor_dtype")


def _validate(bank: AdapterBank, cfg: HydraOptConfig, inputs) -> tuple[torch.Tensor, torch.dtype]:
    w = task_weights(bank, cfg.task_weights)
    if cfg.data_weight and not inputs:
        raise RomscaleError("data_weight > 0 needs inputs (a few examples per task)")
    if not 0.0 <= cfg.data_weight <= 1.0:
        raise RomscaleError(f"data_weight must be in [0, 1], got {cfg.data_weight}")
    if inputs:
        unknown = sorted(set(inputs) - set(bank.names))
        if unknown:
            raise RomscaleError(f"inputs given for unknown tasks {unknown}; tasks are {bank.names}")
    fdtype = factor_dtype(bank, cfg)
    if cfg.storage_unit not in ("bytes", "params"):
        raise RomscaleError(f"storage_unit must be 'bytes' or 'params', got {cfg.storage_unit!r}")
    if cfg.structures != "auto" and (not cfg.structures or any(t not in ("a", "b") for t in cfg.structures)):
        raise RomscaleError(f"structures must be 'auto' or a subset of ('a', 'b'), got {cfg.structures!r}")
    if cfg.grouping not in ("nested", "independent"):
        raise RomscaleError(f"grouping must be 'nested' or 'independent', got {cfg.grouping!r}")
    return w, fdtype


def _fixed_b_groups(cfg: HydraOptConfig, n: int, ka: int, kb: int) -> np.ndarray | None:
    """cfg.b_groups as canonical labels 0..K_B-1, checked against N, K_A and K_B."""
    if cfg.b_groups is None:
        return None
    labels = [int(x) for x in cfg.b_groups]
    if len(labels) != n or sorted(set(labels)) != list(range(kb)):
        raise RomscaleError(f"b_groups must give each of the {n} tasks a B group in 0..{kb - 1} (K_B = {kb}), every group used; got {labels}")
    if 1 < ka < kb:
        raise RomscaleError(f"with fixed b_groups K_A must be 1, K_B ({kb}) or more (A groups refine the B groups); got {ka}")
    if cfg.grouping != "nested":
        raise RomscaleError("fixed b_groups use the nested closed form; grouping must be 'nested'")
    seen: dict[int, int] = {}
    return np.array([seen.setdefault(x, len(seen)) for x in labels], dtype=np.int64)


def _fit_chosen(bank: AdapterBank, cfg: HydraOptConfig, chosen: Candidate, explicit: bool, w: torch.Tensor, fdtype: torch.dtype,
                inputs, workers: int | None, progress: bool):
    """Factors of one configuration for every module, with each task's squared errors."""
    from romscale.adapters.bundle import ModuleFactors

    N = bank.n
    grouping = cfg.grouping if explicit else "nested"
    fixed_b = _fixed_b_groups(cfg, N, chosen.k_a, chosen.k_b) if explicit else None

    def fit_one(_i: int, mod: str):
        P, mg = _problem(bank, mod, w)
        rho = _module_rank(bank, mod, chosen.rank_multiplier, cfg.rank if explicit else None)
        g, k = _labels(P, mg, chosen.tree, chosen.k_a, chosen.k_b, grouping, fixed_b)
        if grouping == "independent":
            # Start: per-group closed form for A with per-task B, then ALS on the crossed groupings.
            At, _ = P.tree_factors(g, np.arange(N), rho)
            Bt = torch.zeros(chosen.k_b, P.B.shape[1], rho, dtype=F64)
            At, Bt, _ = als_refine(P, g, k, At, Bt, iters=cfg.als_iters, tol=cfg.als_tol)
        else:
            At, Bt = _factors(P, g, k, chosen.tree, rho)
        e_data = None
        if cfg.data_weight:
            F = []
            for name in bank.names:
                f = (inputs or {}).get(name, {}).get(mod)
                if f is not None:
                    f = f.to(F64)
                    f = f * math.sqrt(f.shape[1] / float(f.square().sum().clamp_min(1e-300)))
                F.append(f)
            At, Bt, _ = als_refine(P, g, k, At, Bt, inputs=F, data_weight=cfg.data_weight, iters=cfg.als_iters, tol=cfg.als_tol)
            lam_t, _, n_m, _c = _metric_parts(P, F, cfg.data_weight)
            e_data = _metric_errors(P, At, Bt, g, k, F, lam_t, n_m).numpy()
        e2 = P.task_errors_sq(At, Bt, g, k).numpy()
        mf = ModuleFactors(A=At.to(fdtype), B=Bt.to(fdtype), a_group=g.astype(np.int64), b_group=k.astype(np.int64))
        return mf, e2, e_data

    results = map_modules(fit_one, bank.modules, workers=workers, desc="hydraopt fit", progress=progress)
    modules = {mod: r[0] for mod, r in zip(bank.modules, results)}
    err_plain = np.stack([r[1] for r in results])
    err_data = np.stack([r[2] for r in results]) if cfg.data_weight else None
    return modules, err_plain, err_data


def _rms(e: np.ndarray) -> list[float]:
    return [float(math.sqrt(x)) if np.isfinite(x) else 0.0 for x in np.nanmean(e, axis=0)]


def _bundle(bank, cfg, chosen, w, fitted, extra: dict[str, Any]):
    from romscale.adapters.bundle import HydraBundle

    modules, err_plain, err_data = fitted
    lib = bank.storage()
    fdtype = next(iter(modules.values())).A.dtype
    norm = len(bank.modules) * float(w.sum())
    fit: dict[str, Any] = {
        "config": cfg.to_dict(),
        "chosen": {**asdict(chosen), **fractions(chosen.params, fdtype, lib)},
        "objective": float(np.nansum(err_plain * w.numpy()[None, :])) / norm,
        "task_errors": dict(zip(bank.names, _rms(err_plain))),
        "error_definition": "per task: RMS over modules of ||dW - B~A~||_F / ||dW||_F; objective: weighted mean of squared errors",
        **extra,
    }
    if err_data is not None:
        fit["task_errors_data"] = dict(zip(bank.names, _rms(err_data)))
    return HydraBundle(tasks=list(bank.names), modules=modules, template_config=bank.template_config(),
                       library_params=lib.params, library_bytes=lib.bytes, fit=fit, library_dtype=lib.total.dtype)


def fit_hydraopt(
    bank: AdapterBank,
    config: HydraOptConfig | None = None,
    *,
    inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = False,
    workers: int | None = None,
):
    """Fit shared factors for every module of `bank`; returns a HydraBundle (see bundle.py).

    With config.k_a / k_b the configuration is explicit; otherwise config.storage is a target
    fraction of the library's bytes (of its parameters with storage_unit="params") and the
    least-error configuration within it is chosen. Factors are stored in config.factor_dtype,
    by default the inputs' dtype.
    `inputs`: optional task -> module -> F (m x d_in), a factor of the module's input Gram on a few
    examples (activations.collect_input_factors), used when config.data_weight > 0.
    """
    cfg = config or HydraOptConfig()
    if cfg.b_groups is not None and cfg.k_b is None:
        cfg = replace(cfg, k_b=len(set(int(x) for x in cfg.b_groups)), k_a=cfg.k_a or 1)
    if cfg.k_a is None and cfg.k_b is None:
        return fit_hydraopt_many(bank, cfg, [cfg.storage], inputs=inputs, progress=progress, workers=workers)[0]
    w, fdtype = _validate(bank, cfg, inputs)
    N = bank.n
    ka, kb = cfg.k_a or 1, cfg.k_b or 1
    if not (1 <= ka <= N and 1 <= kb <= N):
        raise RomscaleError(f"K_A and K_B must be in [1, {N}], got ({ka}, {kb})")
    if cfg.rank is not None and cfg.rank < 1:
        raise RomscaleError(f"rank must be >= 1, got {cfg.rank}")
    start = time.perf_counter()
    chosen = Candidate("a" if kb >= ka else "b", None if cfg.rank else 1.0, ka, kb, storage_params(bank, ka, kb, 1.0, cfg.rank))
    fitted = _fit_chosen(bank, cfg, chosen, True, w, fdtype, inputs, workers, progress)
    return _bundle(bank, cfg, chosen, w, fitted, {"search_seconds": 0.0, "seconds": round(time.perf_counter() - start, 3)})


def fit_hydraopt_grouped(bank: AdapterBank, b_groups: Sequence[int], *, k_a: int | None = None, config: HydraOptConfig | None = None,
                         progress: bool = False, workers: int | None = None):
    """HydraOpt with the B groups given: a label per task in bank order (e.g. D2C's partition).
    `k_a` None: K_A = K_B = K, every group its own A and B (the least-squares rank-r fit of the
    group; exactly the storage of K rank-r merged LoRAs); 1: one shared A; > K: refinements."""
    k = len({int(x) for x in b_groups})
    cfg = replace(config or HydraOptConfig(), b_groups=tuple(int(x) for x in b_groups), k_b=k, k_a=k if k_a is None else k_a)
    return fit_hydraopt(bank, cfg, progress=progress, workers=workers)


def fit_hydraopt_many(
    bank: AdapterBank,
    config: HydraOptConfig,
    storages: Sequence[float],
    *,
    inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> list:
    """One bundle per storage target, sharing one search over the union of their candidates
    (each target still picks among its own candidates, so results equal separate runs)."""
    cfg = config
    if cfg.b_groups is not None:
        raise RomscaleError("b_groups fix the B groups of an explicit configuration (k_a, k_b); a storage-target search cuts its own")
    w, fdtype = _validate(bank, cfg, inputs)
    start = time.perf_counter()
    structure_info: dict[str, Any] = {}
    if cfg.structures == "auto":
        tree, structure_info = choose_structure(bank, w)
        trees: Sequence[Tree] = (tree,)
    else:
        trees = tuple(cfg.structures)
    per_target = [plan_candidates(bank, replace(cfg, storage=float(f)), trees, fdtype) for f in storages]
    union: list[Candidate] = []
    for cands in per_target:
        union += [c for c in cands if c not in union]
    scores = dict(zip(union, search_candidates(bank, union, w, workers=workers, progress=progress)))
    search_s = time.perf_counter() - start
    norm = len(bank.modules) * float(w.sum())
    lib = bank.storage()
    fitted_cache: dict[Candidate, Any] = {}
    out = []
    for f, cands in zip(storages, per_target):
        chosen = min(cands, key=lambda c: scores[c])
        if chosen not in fitted_cache:
            fitted_cache[chosen] = _fit_chosen(bank, cfg, chosen, False, w, fdtype, inputs, workers, progress)
        extra = {
            "search_seconds": round(search_s, 3),
            "seconds": round(time.perf_counter() - start, 3),
            "structure_choice": {"searched": list(trees), **structure_info},
            "candidates": [{**asdict(c), **fractions(c.params, fdtype, lib), "objective": float(scores[c]) / norm} for c in cands],
        }
        out.append(_bundle(bank, replace(cfg, storage=float(f)), chosen, w, fitted_cache[chosen], extra))
    return out


def _metric_errors(P, At, Bt, g, k, F, lam_t, n_m) -> torch.Tensor:
    gi, ki = torch.as_tensor(g), torch.as_tensor(k)
    out = torch.full((P.n,), float("nan"), dtype=F64)
    for t in range(P.n):
        if n_m[t] <= 0:
            continue
        a, b = At[gi[t]], Bt[ki[t]]
        E_B = torch.cat([P.B[t], -b], dim=1)
        E_A = torch.cat([P.A[t], a], dim=0)
        e = (1 - lam_t[t]) * sq_norm(E_B, E_A)
        if F[t] is not None and lam_t[t] > 0:
            e = e + lam_t[t] * (E_B @ (E_A @ F[t].T)).square().sum()
        out[t] = e.clamp_min(0) / n_m[t]
    return out
