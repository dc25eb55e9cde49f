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
import statistics
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
    from romscale.memories.base import get_memory
    from romscale.train.build import llama_config, meki_config
    from romscale.data.corpus import open_corpus

    cfg = config_from_dict(base)
    corpus = open_corpus(cfg.data.corpus)
    hf = llama_config(cfg.model, corpus.vocab_size, cfg.data.seq_len)
    return get_memory("meki").rom_params(meki_config(cfg.model), hf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="the shared training config (model shape, data, optimiser)")
    ap.add_argument("--work", type=Path, required=True, help="folder of the run folders (one per arm and seed)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="dense=2,meki=2", help="seeds per arm (others: 1)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--sweep-d-mem", default="", help="also MeKi at these d_mem values (comma separated): validation loss "
                    "against ROM parameters, log-x (the paper sees a log-linear trend)")
    ap.add_argument("--sweep-png", type=Path)
    args = ap.parse_args()
    base = load_config(args.config).to_dict()
    seeds = {k: int(v) for k, v in (x.split("=") for x in args.seeds.split(",") if x)}
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; arms are {', '.join(ARMS)}")
    rom = meki_rom_params(base)
    results = {}
    for arm in arms:
        runs = []
        for s in range(seeds.get(arm, 1)):
            out = args.work / f"{arm}-s{s}"
            cfg = config_from_dict(arm_config(base, arm, base["seed"] + s, rom), f"{args.config} [{arm}, seed {s}]")
            summary = train(cfg, out, resume=True, log=print)  # a finished run returns at once; a killed one resumes
            runs.append(summary)
            print(f"{arm} seed {s}: val loss {summary.get('final_val_loss')}", flush=True)
        finals = [r["final_val_loss"] for r in runs]
        results[arm] = {"seeds": len(runs), "val_loss_mean": statistics.fmean(finals),
                        "val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                        "val_loss": finals, "curves": [r["val_curve"] for r in runs], "tokens": runs[0]["tokens"]}
    sweep = []
    for d in [int(x) for x in args.sweep_d_mem.split(",") if x]:
        cfg_d = copy.deepcopy(base)
        cfg_d["model"]["meki"]["d_mem"] = d
        cfg = config_from_dict(arm_config(cfg_d, "meki", base["seed"], None), f"{args.config} [meki d_mem {d}]")
        summary = train(cfg, args.work / f"sweep-d{d}", resume=True, log=print)
        sweep.append({"d_mem": d, "rom_params": meki_rom_params(cfg_d), "val_loss": summary["final_val_loss"]})
        print(f"sweep d_mem {d}: ROM {sweep[-1]['rom_params']:,} params, val loss {summary['final_val_loss']}", flush=True)
    out = {"machine": machine_line(), "config": base, "meki_rom_params": rom, "arms": results, "d_mem_sweep": sweep,
           "command": "python benchmarks/meki_scratch.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None)}
    if "dense" in results and "meki" in results:
        gap = results["dense"]["val_loss_mean"] - results["meki"]["val_loss_mean"]
        out["targets"] = {"meki_below_dense_by_0.1": {"gap": gap, "met": gap >= 0.1},
                          **{f"meki_below_{a}": {"gap": results[a]["val_loss_mean"] - results["meki"]["val_loss_mean"],
                                                 "met": results[a]["val_loss_mean"] > results["meki"]["val_loss_mean"]}
                             for a in ("ple", "engram", "fat") if a in results}}
    write_json_output(args.json, out, kind="meki-scratch", overwrite=True)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, r in results.items():
            for i, curve in enumerate(r["curves"]):
                xs, ys = zip(*curve)
                ax.plot(xs, ys, label=f"{arm} ({r['val_loss_mean']:.3f})" if i == 0 else None, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"from scratch, same tokens; memories at MeKi's ROM ({rom:,} params)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_png_output(args.png, fig, overwrite=True)
    if args.sweep_png and sweep:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["rom_params"] for p in sweep], [p["val_loss"] for p in sweep], marker="o", label="MeKi")
        if "dense" in results:
            ax.axhline(results["dense"]["val_loss_mean"], color="grey", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("ROM parameters (log scale)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_png_output(args.sweep_png, fig, overwrite=True)


if __name__ == "__main__":
    main()
