"""D2C's speed: the cached, batched, factored implementation against the plain one, same seed.

fast:  merged adapters cached by member set, losses by (task, member set); TIES from per-task trimmed
       vectors and kept member-set sums (romscale.adapters.ties_sums); the merged LoRA applied in
       factored form (romscale.eval.slot.AdapterSlot.set); the n examples of a task share one forward
       of their common prompt prefix (romscale.eval.prefix) and run in length buckets;
plain: no caches; every merge from the adapters' factors (cluster_merger(incremental=False)); every
       loss evaluation adds the merged update into the base weights, runs the task's examples in one
       padded batch, and restores the weights (AdapterSlot.merged_into_weights).
Both runs use one loaded base model, the same library, tasks, K, T, n and seed; the script checks
that they end in the same partition and prints the wall-time ratio (measured in this one run),
also after every --every iterations: caches pay off more as T grows.

    python benchmarks/d2c_speed.py --lib runs/adapters-cpu16/lib --bank runs/bank --tasks cpu-16 \
        --k 4 --iterations 200 --every 25 --json results/d2c_speed_cpu16_k4.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from romscale.adapters.clusterers import ClusterProblem, cluster_merger
from romscale.adapters.d2c import D2CConfig, run_d2c
from romscale.adapters.library import load_library
from romscale.adapters.merge import MergeOptions
from romscale.adapters.taskloss import model_loss
from romscale.adapters.train import load_base
from romscale.data.taskbank import TaskBank
from romscale.eval.generate import TaskEvaluator
from romscale.eval.slot import AdapterSlot
from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, required=True, help="adapter library (romscale adapters train)")
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--tasks", default="cpu-16")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--accept", default="moved", choices=("moved", "total"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=25, help="report the ratio after every this many iterations")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    bank = TaskBank.open(args.bank, args.tasks)
    lib = load_library(args.lib, tasks=bank.names)
    model, tok = load_base(args.base, progress=False)
    slot = AdapterSlot(model, rank=max(lib.max_rank(m) for m in lib.modules))
    ev = TaskEvaluator(model, tok, slot, batch_size=args.n, bf16=args.bf16)
    runs, curves = {}, {}
    for name, fast in (("fast", True), ("plain", False)):
        merge = cluster_merger(lib, "ties", MergeOptions(density=0.5, seed=args.seed), incremental=fast)
        loss = model_loss(ev, bank, n=args.n, mode="factored" if fast else "plain", tasks=bank.names, share_prefix=fast)
        cfg = D2CConfig(k=args.k, iterations=args.iterations, accept=args.accept, seed=args.seed, n=args.n, cache=fast)
        curve = curves[name] = {}
        t0 = time.perf_counter()

        def tick(it: int, _stats, curve=curve, t0=t0) -> None:
            if it % args.every == 0 or it == args.iterations:
                curve[it] = time.perf_counter() - t0

        res = run_d2c(ClusterProblem(bank=lib, merge=merge, loss=loss), cfg, progress=True, on_iteration=tick)
        runs[name] = {"seconds": round(time.perf_counter() - t0, 2), "partition": res.partition, **res.summary()}
        runs[name].pop("history", None)
        print(f"{name}: {runs[name]['seconds']} s, counts {runs[name].get('counts')}", flush=True)
    same = runs["fast"]["partition"] == runs["plain"]["partition"]
    ratio = runs["plain"]["seconds"] / runs["fast"]["seconds"]
    by_t = [{"iterations": it, "fast_s": round(curves["fast"][it], 2), "plain_s": round(curves["plain"][it], 2),
             "speedup": round(curves["plain"][it] / curves["fast"][it], 3)} for it in sorted(curves["fast"])]
    print(f"{'T':>6} {'fast s':>9} {'plain s':>9} {'plain/fast':>10}")
    for row in by_t:
        print(f"{row['iterations']:>6} {row['fast_s']:>9.1f} {row['plain_s']:>9.1f} {row['speedup']:>9.2f}x")
    print(f"same final partition: {same}; plain / fast wall time = {ratio:.2f}x (target >= 5x)")
    write_json_output(args.json, {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_line(), "tasks": bank.names, "k": args.k, "iterations": args.iterations, "n": args.n,
        "accept": args.accept, "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "runs": runs, "by_iterations": by_t, "same_partition": same, "speedup": ratio, "target": ">= 5x",
        "met": ratio >= 5 and same,
    }, kind="d2c-speed", overwrite=True)


if __name__ == "__main__":
    main()
