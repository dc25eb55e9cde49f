"""Reconstruction report: how far each method's stored adapters are from each task's own update,
per method and storage budget, with no evaluation data. Errors are computed in factored form.

Task error: RMS over modules of ||dW_t - dW_t^approx||_F / ||dW_t||_F, where dW_t^approx is the
merged update (classic merges: one adapter for every task) or the task's HydraOpt update.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from romscale.errors import RomscaleError
from romscale.adapters.bank import AdapterBank
from romscale.adapters.factors import rel_error_sq
from romscale.adapters.hydraopt import HydraOptConfig, factor_dtype, fit_hydraopt_many, storage_params
from romscale.adapters.merge import MergeOptions, get_merge_method, merge_adapters
from romscale.adapters.storage import StorageReport, itemsize

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties", "magnitude_prune", "knots", "linear_ab", "ties_ab")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75)


def merged_task_errors(bank: AdapterBank, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Each task's error when every task uses the same merged (A, B) per module."""
    e2 = np.zeros((len(bank.modules), bank.n))
    for i, mod in enumerate(bank.modules):
        A, B = bank.stack(mod).padded(torch.float64)
        Am, Bm = factors[mod]
        e2[i] = rel_error_sq(B, A, Bm.double().expand(bank.n, -1, -1), Am.double().expand(bank.n, -1, -1)).numpy()
    return [math.sqrt(x) if np.isfinite(x) else 0.0 for x in np.nanmean(e2, axis=0)]


def _row(name: str, family: str, budget: str, storage: dict[str, Any], errs: Sequence[float], names: Sequence[str], secs: float,
         extra: dict | None = None) -> dict[str, Any]:
    e = np.asarray(errs)
    return {
        "method": name,
        "family": family,
        "budget": budget,
        **storage,
        "rms_error": float(np.sqrt(np.mean(e**2))),
        "mean_error": float(e.mean()),
        "max_error": float(e.max()),
        "task_errors": dict(zip(names, (float(x) for x in e))),
        "seconds": round(secs, 3),
        **(extra or {}),
    }


def _storage(st: StorageReport, lib: StorageReport) -> dict[str, Any]:
    return {"storage_params": st.params, "storage_bytes": st.bytes, "storage_dtype": st.total.dtype,
            "storage_fraction_params": st.params / lib.params, "storage_fraction_bytes": st.bytes / lib.bytes}


def reconstruction_report(
    bank: AdapterBank,
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    *,
    merge_options: MergeOptions | None = None,
    hydra_config: HydraOptConfig | None = None,
    include_single: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Rows for every classic merge (at its own storage) and HydraOpt at each storage budget.

    Budgets are fractions of the library's bytes, or of its parameters with
    hydra_config.storage_unit == "params"; every row states both, and the dtype. `include_single`
    adds HydraOpt at the storage of one merged adapter (K_A = K_B = 1, rank r)."""
    for m in methods:
        get_merge_method(m)  # fail early on a typo
    budgets = check_budgets(budgets)
    lib = bank.storage()
    rows = []
    for m in tqdm(list(methods), desc="report merges", disable=not progress):
        t0 = time.perf_counter()
        res = merge_adapters(bank, m, merge_options)
        errs = merged_task_errors(bank, {mod: (lm.A, lm.B) for mod, lm in res.adapter.modules.items()})
        rank = max(lm.r for lm in res.adapter.modules.values())
        rows.append(_row(m, res.family, f"rank {rank}", _storage(res.storage, lib), errs, bank.names, time.perf_counter() - t0,
                         {"weights": res.weights}))
    base = replace(hydra_config or HydraOptConfig(), k_a=None, k_b=None)
    fdtype = factor_dtype(bank, base)
    unit = base.storage_unit

    def fraction(params: int) -> float:  # of the library, in the budgets' unit
        return params / lib.params if unit == "params" else params * itemsize(fdtype) / lib.bytes

    fractions = sorted(set(budgets))
    single = fraction(storage_params(bank, 1, 1, 1.0))
    if include_single:
        fractions = sorted(set(fractions) | {single})
    lowest = min(fraction(storage_params(bank, 1, 1, m)) for m in base.rank_multipliers)
    skipped = [f for f in fractions if not lowest <= f <= 1]
    fractions = [f for f in fractions if lowest <= f <= 1]
    if fractions:
        t0 = time.perf_counter()
        bundles = fit_hydraopt_many(bank, base, fractions, progress=progress)
        secs = (time.perf_counter() - t0) / len(fractions)
        for f, b in zip(fractions, bundles):
            c = b.fit["chosen"]
            label = "single adapter" if math.isclose(f, single) else f"{f:g}"
            rows.append(_row("hydraopt", "shared factors", label, _storage(b.storage(), lib), [b.fit["task_errors"][n] for n in bank.names],
                             bank.names, secs, {"target": f, "chosen": {k: c[k] for k in ("tree", "rank_multiplier", "k_a", "k_b")},
                                                "objective": b.fit["objective"]}))
    return {
        "n_adapters": bank.n,
        "tasks": bank.names,
        "library_storage": lib.to_dict(per_module=False),
        "storage_unit": unit,
        "error_definition": "per task: RMS over modules of ||dW_t - approx||_F / ||dW_t||_F (factored form)",
        "merge_options": (merge_options or MergeOptions()).to_dict(),
        "rows": rows,
        "skipped_budgets": skipped,
    }


def check_budgets(budgets: Sequence[float]) -> list[float]:
    out = [float(b) for b in budgets]
    if not out or any(not 0 < b <= 1 for b in out):
        raise RomscaleError(f"budgets must be fractions of the library in (0, 1], got {out}")
    return out
