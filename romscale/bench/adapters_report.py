"""Tables, targets and the plot of the adapter benchmark (score vs storage in bytes)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

REFERENCES = ("zero_shot", "individual")


def _label(p: dict[str, Any]) -> str:
    m = p["method"]
    return m.split("/", 1)[1] if "/" in m else m


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method and budget: mean score over seeds (each seed's score is the mean over
    tasks), its sample std, and the storage in bytes / parameters (mean over seeds)."""
    groups: dict[tuple[str, Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(p["method"], p.get("k"), p.get("fraction"))].append(p)
    rows = []
    for (method, k, fraction), ps in groups.items():
        means = [p["mean_score"] for p in ps]
        rows.append({
            "method": method,
            "label": _label(ps[0]),
            "k": k,
            "fraction": fraction,
            "seeds": len(ps),
            "mean": statistics.fmean(means),
            "std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "storage_pct_bytes": 100 * statistics.fmean(p["storage"]["fraction_bytes"] for p in ps),
            "storage_bytes": round(statistics.fmean(p["storage"]["bytes"] for p in ps)),
            "storage_params": round(statistics.fmean(p["storage"]["params"] for p in ps)),
            "dtype": ps[0]["storage"]["dtype"],
        })
    rows.sort(key=lambda r: (r["storage_pct_bytes"], r["method"]))
    return rows


def _find(rows, method, k=None):
    for r in rows:
        if r["method"] == method and (k is None or r["k"] == k):
            return r
    return None


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The papers' ordering as checks, each with its figures (None where a point is missing)."""
    out: dict[str, Any] = {}
    ind = _find(rows, "individual")
    ks = sorted({r["k"] for r in rows if r["k"] is not None})
    if ks:
        k = ks[0]
        d2c = _find(rows, "cluster/d2c-moved", k)
        svd = _find(rows, "cluster/kmeans_svd", k)
        if d2c and svd:
            out["d2c_vs_kmeans_svd"] = {"k": k, "storage_pct": d2c["storage_pct_bytes"], "d2c": d2c["mean"],
                                        "kmeans_svd": svd["mean"], "margin": d2c["mean"] - svd["mean"],
                                        "target": ">= +2 points", "met": d2c["mean"] >= svd["mean"] + 2}
    hyd = [r for r in rows if r["method"] == "hydraopt"]
    if ind and hyd:
        within = [r for r in hyd if r["storage_pct_bytes"] <= 52.0]
        if within:
            best = max(within, key=lambda r: r["mean"])
            rel = (ind["mean"] - best["mean"]) / ind["mean"] if ind["mean"] else float("nan")
            out["hydraopt_half"] = {"storage_pct": best["storage_pct_bytes"], "hydraopt": best["mean"],
                                    "individual": ind["mean"], "relative_drop": rel,
                                    "target": "<= 2% relative drop at <= 52% of the bytes", "met": rel <= 0.02}
        single = min(hyd, key=lambda r: r["storage_pct_bytes"])
        merges = [r for r in rows if r["method"] in ("merge/task_arithmetic", "merge/ties", "merge/dare_ties")]
        if merges:
            best_merge = max(merges, key=lambda r: r["mean"])
            out["hydraopt_single_vs_merges"] = {"storage_pct": single["storage_pct_bytes"], "hydraopt": single["mean"],
                                                "best_merge": best_merge["label"], "best_merge_score": best_merge["mean"],
                                                "target": ">= the best of TA / TIES / DARE", "met": single["mean"] >= best_merge["mean"]}
    return out


def markdown(results: dict[str, Any]) -> str:
    rows = results["summary"]
    lib = results["library"]
    lines = [
        f"# Adapter library benchmark: mean task score vs storage ({results['machine']})",
        "",
        (f"{len(results['tasks'])} tasks, library {lib['adapters']} LoRAs = {lib['bytes']:,} bytes ({lib['dtype']}), "
         f"{lib['params']:,} parameters. Score: mean over tasks of each task's metric (0-100); "
         "mean +- std over seeds."),
        "",
        "| method | K | storage (% bytes) | bytes | params | seeds | mean score |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["k"] if r["k"] is not None else ""
        score = f"{r['mean']:.2f}" + (f" +- {r['std']:.2f}" if r["seeds"] > 1 else "")
        lines.append(f"| {r['label']} | {k} | {r['storage_pct_bytes']:.1f} | {r['storage_bytes']:,} | "
                     f"{r['storage_params']:,} | {r['seeds']} | {score} |")
    lines += ["", "## Targets", ""]
    for name, t in results.get("targets", {}).items():
        figs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if k not in ("met", "target"))
        lines.append(f"- **{name}** ({t['target']}): {'met' if t['met'] else 'NOT met'}: {figs}")
    missing = results.get("missing")
    if missing:
        lines += ["", f"Not computed in this run: {', '.join(missing)}"]
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any]):
    """Mean score vs storage (% of the library's bytes): one line per method, error bars over
    seeds, zero-shot and individual LoRAs as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for ref, style in zip(REFERENCES, ("--", ":")):
        r = _find(rows, ref)
        if r:
            ax.axhline(r["mean"], linestyle=style, color="grey", label=f"{ref.replace('_', '-')} ({r['mean']:.1f})")
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] in REFERENCES:
            continue
        lines[r["label"] if r["method"] not in ("hydraopt", "d2c_hydraopt") else r["method"]].append(r)
    # matplotlib's default cycle has 10 colours and a full benchmark draws ~13 lines: a colour of
    # tab20 and a marker each, so no two lines look alike
    colours, markers = plt.get_cmap("tab20").colors, "osD^vP*Xph<>"
    for i, (label, rs) in enumerate(sorted(lines.items())):
        rs.sort(key=lambda r: r["storage_pct_bytes"])
        ax.errorbar([r["storage_pct_bytes"] for r in rs], [r["mean"] for r in rs], yerr=[r["std"] for r in rs],
                    marker=markers[i % len(markers)], color=colours[(2 * i) % 20 + (i // 10) % 2], capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("storage (% of the library's bytes, log scale)")
    ax.set_ylabel("mean task score (0-100)")
    ax.set_title(f"{len(results['tasks'])} tasks\n{results['machine']}", fontsize=9)  # machine names run long
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
