"""D2C's speed: the cached, batched, factored implementation against the plain one, same seed.

fast:  merged adapters cached by member set, losses by (task, member set), the n examples of a task
       in one forward, the merged LoRA applied in factored form (romscale.eval.slot.AdapterSlot.set);
plain: no caches; every loss evaluation adds the merged update into the base weights, runs the
       task's examples, and restores the weights (AdapterSlot.merged_into_weights).
Both runs use one loaded base model, the same library, tasks, K, T, n and seed; the script checks
that they end in the same partition and prints the wall-time ratio (measured in this one run).

    python benchmarks/d2c_speed.py --lib runs/adapters-cpu16/lib --bank runs/bank --tasks cpu-16 \
        --k 4 --iterations 30 --json results/d2c_speed_cpu.json
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    bank = TaskBank.open(args.bank, args.tasks)
    lib = load_library(args.lib, tasks=bank.names)
    model, tok = load_base(args.base, progress=False)
    slot = AdapterSlot(model, rank=max(lib.max_rank(m) for m in lib.modules))
    ev = TaskEvaluator(model, tok, slot, batch_size=args.n, bf16=args.bf16)
    runs = {}
    for name, cache, mode in (("fast", True, "factored"), ("plain", False, "plain")):
        problem = ClusterProblem(bank=lib, merge=cluster_merger(lib, "ties", MergeOptions(density=0.5, seed=args.seed)),
                                 loss=model_loss(ev, bank, n=args.n, mode=mode, tasks=bank.names))
        cfg = D2CConfig(k=args.k, iterations=args.iterations, accept=args.accept, seed=args.seed, n=args.n, cache=cache)
        t0 = time.perf_counter()
        res = run_d2c(problem, cfg, progress=True)
        runs[name] = {"seconds": round(time.perf_counter() - t0, 2), "partition": res.partition, **res.summary()}
        runs[name].pop("history", None)
        print(f"{name}: {runs[name]['seconds']} s, counts {runs[name].get('counts')}", flush=True)
    same = runs["fast"]["partition"] == runs["plain"]["partition"]
    ratio = runs["plain"]["seconds"] / runs["fast"]["seconds"]
    print(f"same final partition: {same}; plain / fast wall time = {ratio:.2f}x (target >= 5x)")
    write_json_output(args.json, {
        "command": "python benchmarks/d2c_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True)) + (" --bf16" if args.bf16 else ""),
        "machine": machine_line(), "tasks": bank.names, "k": args.k, "iterations": args.iterations, "n": args.n,
        "accept": args.accept, "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "runs": runs, "same_partition": same, "speedup": ratio, "target": ">= 5x", "met": ratio >= 5 and same,
    }, kind="d2c-speed", overwrite=True)


if __name__ == "__main__":
    main()
