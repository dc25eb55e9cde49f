"""HydraOpt at one adapter's bytes, investigated (the benchmark's missed target: at least as good as
the best of TA / TIES / DARE; docs/adapters.md).

At one adapter's storage HydraOpt is K_A = K_B = 1 at rank r: the best rank-r fit of the
normalised mean update (least squares over tasks). This scores, in one run on one loaded model,
on the benchmark's own library and test examples:
- the benchmark's point (plain reconstruction), and the data-aware fit (the design note's optional
  term: the error on each module's inputs from n examples per task, the D2C examples) at two weights;
- the same factors with B scaled by 2 and 4: a diagnosis, not a method. A mean of N updates that
  disagree is smaller than any one of them, while TIES keeps each agreeing entry's size;
- TA / TIES / DARE-TIES as the references, recomputed in the same run.

    python benchmarks/hydraopt_single.py CONFIG.yaml --work WORK --json PATH [--n 10]

WORK is the benchmark's work folder (`romscale adapters benchmark CONFIG --out WORK`) with every
adapter trained; nothing in it is changed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from romscale.adapters.activations import collect_input_factors
from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt
from romscale.adapters.peft_io import LoraAdapter, LoraModule
from romscale.adapters.taskloss import loss_examples
from romscale.bench.adapters import AdapterBenchmark, AdapterBenchmarkConfig
from romscale.eval.prompting import encode_example
from romscale.utils.config import load
from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output


def scaled(adapter: LoraAdapter, factor: float) -> LoraAdapter:
    mods = {m: LoraModule(lm.A, lm.B * factor, lm.alpha, lm.use_rslora) for m, lm in adapter.modules.items()}
    return replace(adapter, modules=mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10, help="examples per task for the data-aware term (val split)")
    ap.add_argument("--data-weights", default="0.5,1.0")
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--references", default="task_arithmetic,ties,dare_ties")
    args = ap.parse_args()

    cfg = load(AdapterBenchmarkConfig, args.config, what="benchmark config")
    bench = AdapterBenchmark(cfg, args.work)
    bench._setup(report_only=True)  # the trained library as it is; nothing is trained or written
    lib, names = bench.library, bench.names
    single = (1.0 / lib.n) * (1 + 1e-9)  # the benchmark's single-adapter budget
    rows: list[dict] = []

    def score(label: str, adapter: LoraAdapter, **extra) -> None:
        t0 = time.perf_counter()
        scores = bench._score_assignment({t: adapter for t in names})
        mean = sum(s["score"] for s in scores.values()) / len(scores)
        rows.append({"variant": label, "mean_score": mean, "scores": {t: s["score"] for t, s in scores.items()},
                     "eval_seconds": round(time.perf_counter() - t0, 1), **extra})
        print(f"{label:<34} {mean:6.2f}", flush=True)

    for m in [m for m in args.references.split(",") if m]:
        score(m, bench._merge(tuple(names), m))
    plain = fit_hydraopt(lib, HydraOptConfig(storage=single))
    chosen = plain.fit["chosen"]
    score("hydraopt", plain.task_adapter(names[0]), chosen={k: chosen[k] for k in ("k_a", "k_b", "rank_multiplier")})
    for f in [float(x) for x in args.scales.split(",") if x]:
        score(f"hydraopt, B x {f:g} (diagnosis)", scaled(plain.task_adapter(names[0]), f))
    ev = bench._evaluator()
    ev.slot.set(None)  # inputs of the base model, as the adapters saw them in training
    examples = loss_examples(bench.bank, names, args.n)
    ids = {t: [encode_example(ev.tokenizer, bench.bank.task(t), ex, bench.train_cfg.max_len)[0] for ex in exs]
           for t, exs in examples.items()}
    t0 = time.perf_counter()
    factors = collect_input_factors(ev.model, ids, lib.modules)
    collect_s = round(time.perf_counter() - t0, 1)
    for lam in [float(x) for x in args.data_weights.split(",") if x]:
        t0 = time.perf_counter()
        b = fit_hydraopt(lib, HydraOptConfig(storage=single, data_weight=lam), inputs=factors)
        score(f"hydraopt, data-aware {lam:g}", b.task_adapter(names[0]), fit_seconds=round(time.perf_counter() - t0, 1),
              collect_seconds=collect_s)
    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),  # as typed, empty options too
           "machine": machine_line(), "tasks": names, "library_sha256": bench.lib_sha256,
           "split": cfg.split, "limit": cfg.limit, "n": args.n, "variants": rows}
    write_json_output(args.json, doc, kind="hydraopt-single-investigation", inputs=[args.config, args.work])
    print(json.dumps({r["variant"]: round(r["mean_score"], 2) for r in rows}))


if __name__ == "__main__":
    main()
