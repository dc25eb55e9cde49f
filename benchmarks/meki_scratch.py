"""MeKi's quality claim from scratch: every arm trained by `romscale.train` on the same corpus, the
same token count (one pass, no repeats) and the same RAM architecture, memories at MeKi's ROM.

Arms: dense; MeKi (static + dynamic); MeKi static-only; MeKi dynamic-only; PLE, Engram and the fat
embedding sized to MeKi's ROM parameters (model.rom_params). Seeds per arm from --seeds (e.g.
dense=2,meki=2, the rest 1). Each run is a resumable run folder under --work (rerun the same command
after an interruption); the summary JSON holds each arm's final validation loss, mean and spread
over seeds, its ROM / RAM parameters and the curves, and a PNG of the curves.

    romscale data corpus --out runs/corpus
    python benchmarks/meki_scratch.py --config configs/scratch-cpu.yaml --work runs/scratch \
        --seeds dense=2,meki=2 --json results/meki_scratch_cpu.json --png results/meki_scratch_cpu.png \
        --sweep-d-mem 8,16,32,64 --sweep-png results/meki_dmem_sweep_cpu.png
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import traceback
from pathlib import Path

from romscale.train.config import config_from_dict, load_config
from romscale.train.trainer import train
from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output, write_png_output

ARMS = ("dense", "meki", "meki-static", "meki-dynamic", "ple", "engram", "fat")


def arm_config(base: dict, arm: str, seed: int, meki_rom: int | None) -> dict:
    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    m = cfg["model"]
    m.pop("rom_params", None)
    m["memory_options"] = {}
    if arm == "dense":
        m["memory"] = "none"
    elif arm.startswith("meki"):
        m["memory"] = "meki"
        m["meki"]["memory"] = {"meki": "static+dynamic", "meki-static": "static", "meki-dynamic": "dynamic"}[arm]
    else:
        m["memory"], m["rom_params"] = arm, meki_rom
    return cfg


def meki_rom_params(base: dict) -> int:
    """MeKi's ROM parameters for this model (the budget every other memory arm is sized to)."""
    from romscale.data.corpus import open_corpus
    from romscale.memories.base import get_memory
    from romscale.train.build import llama_config, meki_config

    cfg = config_from_dict(base)
    corpus = open_corpus(cfg.data.corpus)
    hf = llama_config(cfg.model, corpus.vocab_size, cfg.data.seq_len)
    return get_memory("meki").rom_params(meki_config(cfg.model), hf)


def _shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"error: --shard: expected i/n (e.g. 0/3), got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"error: --shard: expected 0 <= i < n, got {text!r}")
    return i, n


def _command(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/meki_scratch.py"]
    for k, v in vars(args).items():
        if v is True:
            parts.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False, ""):
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="the shared training config (model shape, data, optimiser)")
    ap.add_argument("--work", type=Path, help="folder of the run folders (one per arm and seed)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="dense=2,meki=2", help="seeds per arm (others: 1)")
    ap.add_argument("--json", type=Path, help="the report (needed unless --replot)")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--sweep-d-mem", default="", help="also MeKi at these d_mem values (comma separated): validation loss "
                    "against ROM parameters, log-x (the paper sees a log-linear trend)")
    ap.add_argument("--sweep-png", type=Path)
    ap.add_argument("--shard", default="", help="i/n: run only every n-th run from the i-th (parallel processes), no report")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    ap.add_argument("--replot", type=Path, help="only redraw --png / --sweep-png from this report JSON")
    args = ap.parse_args()
    if args.replot:
        plots(json.loads(args.replot.read_text()), args.png, args.sweep_png)
        return
    for name in ("config", "work", "json"):
        if getattr(args, name) is None:
            ap.error(f"--{name} is required (unless --replot)")
    base = load_config(args.config).to_dict()
    seeds = {k: int(v) for k, v in (x.split("=") for x in args.seeds.split(",") if x)}
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; arms are {', '.join(ARMS)}")
    rom = meki_rom_params(base)
    shard = _shard(args.shard)
    # Every run (arm x seed, then the sweep points) is one job; --shard i/n runs every n-th job from i
    # (several processes on one GPU), --report-only gathers the finished ones without training.
    jobs = [(arm, s, args.work / f"{arm}-s{s}", arm_config(base, arm, base["seed"] + s, rom), f"{arm}, seed {s}")
            for arm in arms for s in range(seeds.get(arm, 1))]
    sweep_ds = [int(x) for x in args.sweep_d_mem.split(",") if x]
    for d in sweep_ds:
        cfg_d = copy.deepcopy(base)
        cfg_d["model"]["meki"]["d_mem"] = d
        # the sweep point at the arms' own d_mem is the MeKi arm's seed-0 run (same config): reuse it
        same = d == base["model"]["meki"]["d_mem"] and "meki" in arms
        if not same:
            jobs.append((f"sweep-d{d}", 0, args.work / f"sweep-d{d}", arm_config(cfg_d, "meki", base["seed"], None), f"meki d_mem {d}"))
    done: dict[Path, dict] = {}
    failed: dict[str, str] = {}
    for j, (arm, s, folder, raw, label) in enumerate(jobs):
        if args.report_only or (shard and j % shard[1] != shard[0]):
            if (folder / "run.json").is_file():
                rec = json.loads((folder / "run.json").read_text())
                if rec.get("status") == "done":
                    done[folder] = rec
            continue
        try:
            done[folder] = train(config_from_dict(raw, f"{args.config} [{label}]"), folder, resume=True, log=print)
        except Exception as exc:  # noqa: BLE001 - one failed arm must not lose the others' runs; it is reported as failed
            traceback.print_exc()
            failed[str(folder)] = f"{type(exc).__name__}: {exc}"
            continue
        print(f"{label}: val loss {done[folder].get('final_val_loss')}", flush=True)
    missing = [str(f) for (_, _, f, _, _) in jobs if f not in done]
    if shard:
        print(f"shard {args.shard}: done; {len(missing)} runs of other shards not finished yet")
        return
    results = {}
    for arm in arms:
        runs = [done[f] for (a, _, f, _, _) in jobs if a == arm and f in done]
        if not runs:
            continue
        finals = [r["final_val_loss"] for r in runs]
        results[arm] = {"seeds": len(runs), "val_loss_mean": statistics.fmean(finals),
                        "val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                        "val_loss": finals, "curves": [r["val_curve"] for r in runs], "tokens": runs[0]["tokens"]}
    sweep = []
    for d in sweep_ds:
        folder = args.work / ("meki-s0" if d == base["model"]["meki"]["d_mem"] and "meki" in arms else f"sweep-d{d}")
        if folder in done:
            cfg_d = copy.deepcopy(base)
            cfg_d["model"]["meki"]["d_mem"] = d
            sweep.append({"d_mem": d, "rom_params": meki_rom_params(cfg_d), "val_loss": done[folder]["final_val_loss"]})
            print(f"sweep d_mem {d}: ROM {sweep[-1]['rom_params']:,} params, val loss {sweep[-1]['val_loss']}", flush=True)
    out = {"machine": machine_line(), "config": base, "meki_rom_params": rom, "arms": results, "d_mem_sweep": sweep,
           "missing_runs": missing, "failed_runs": failed,
           "command": _command(args)}
    if "dense" in results and "meki" in results:
        gap = results["dense"]["val_loss_mean"] - results["meki"]["val_loss_mean"]
        out["targets"] = {"meki_below_dense_by_0.1": {"gap": gap, "met": gap >= 0.1},
                          **{f"meki_below_{a}": {"gap": results[a]["val_loss_mean"] - results["meki"]["val_loss_mean"],
                                                 "met": results[a]["val_loss_mean"] > results["meki"]["val_loss_mean"]}
                             for a in ("ple", "engram", "fat") if a in results}}
    write_json_output(args.json, out, kind="meki-scratch", overwrite=True)
    plots(out, args.png, args.sweep_png)


def plots(report: dict, png: Path | None, sweep_png: Path | None) -> None:
    """The curves (one colour per arm, a thin line per seed, the legend giving mean +- std) and the
    d_mem sweep, from a report (also --replot: a report JSON written earlier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, sweep = report["arms"], report["d_mem_sweep"]
    if png:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colours = plt.get_cmap("tab10")
        for k, (arm, r) in enumerate(results.items()):
            for i, curve in enumerate(r["curves"]):
                xs, ys = zip(*curve)
                label = f"{arm} ({r['val_loss_mean']:.3f} ± {r['val_loss_std']:.3f}, {r['seeds']} seeds)" if i == 0 else None
                ax.plot(xs, ys, color=colours(k % 10), label=label, alpha=0.8, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"from scratch, same tokens; memories at MeKi's ROM ({report['meki_rom_params']:,} params)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_png_output(png, fig, overwrite=True)
    if sweep_png and sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["rom_params"] for p in sweep], [p["val_loss"] for p in sweep], marker="o", label="MeKi (seed 0)")
        for p in sweep:
            ax.annotate(f"d_mem {p['d_mem']}", (p["rom_params"], p["val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if "dense" in results:
            ax.axhline(results["dense"]["val_loss_mean"], color="grey", linestyle="--", label="dense (mean)")
        ax.set_xscale("log")
        ax.set_xlabel("ROM parameters (log scale)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_png_output(sweep_png, fig, overwrite=True)

if __name__ == "__main__":
    main()
