"""The retrofit's two targets from its run folders and `romscale eval mc` reports: MeKi's continued
model against the dense continued model (same tokens, same order), in validation loss and in the
zero-shot multiple-choice average, with the pretrained model's average for reference.

    python benchmarks/meki_retrofit_summary.py --meki RUN --dense RUN --mc-base MC.json \
        --mc-meki MC.json --mc-dense MC.json --machine "NVIDIA H200" --json results/meki_retrofit_gpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from romscale.utils.outputs import write_json_output


def _run(folder: Path) -> dict:
    rec = json.loads((folder / "run.json").read_text())
    if rec.get("status") != "done":
        raise SystemExit(f"error: {folder}: the run is not finished (run.json status {rec.get('status')!r})")
    keep = ("steps", "tokens", "precision", "final_loss", "final_val_loss", "val_curve", "mean_step_seconds", "parameters", "memory")
    return {k: rec.get(k) for k in keep}


def _mc(path: Path) -> dict:
    rec = json.loads(path.read_text())
    return {"mean": rec["mean"], "tasks": {n: {k: t[k] for k in ("n", "acc", "acc_norm", "chance")} for n, t in rec["tasks"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("meki", "dense"):
        ap.add_argument(f"--{name}", type=Path, required=True, help=f"the {name} continued run folder (romscale train)")
    for name in ("base", "meki", "dense"):
        ap.add_argument(f"--mc-{name}", type=Path, required=True, help=f"romscale eval mc --json of the {name} model")
    ap.add_argument("--machine", required=True, help="where the runs ran (recorded in the JSON)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    meki, dense = _run(args.meki), _run(args.dense)
    mc = {"pretrained": _mc(args.mc_base), "meki": _mc(args.mc_meki), "dense": _mc(args.mc_dense)}
    gap = dense["final_val_loss"] - meki["final_val_loss"]
    acc_gap = mc["meki"]["mean"]["acc"] - mc["dense"]["mean"]["acc"]
    out = {"machine": args.machine, "runs": {"meki": meki, "dense": dense}, "mc": mc,
           "targets": {"meki_val_below_dense": {"gap_nats": gap, "met": gap > 0},
                       "meki_mc_not_worse": {"acc_gap": acc_gap,
                                             "acc_norm_gap": mc["meki"]["mean"]["acc_norm"] - mc["dense"]["mean"]["acc_norm"],
                                             "met": acc_gap >= 0}}}
    write_json_output(args.json, out, kind="meki-retrofit", overwrite=True)
    print(f"val loss: MeKi {meki['final_val_loss']:.4f}, dense {dense['final_val_loss']:.4f} (gap {gap:+.4f} nats); "
          f"MC acc: MeKi {100 * mc['meki']['mean']['acc']:.1f}, dense {100 * mc['dense']['mean']['acc']:.1f}, "
          f"pretrained {100 * mc['pretrained']['mean']['acc']:.1f}")


if __name__ == "__main__":
    main()
