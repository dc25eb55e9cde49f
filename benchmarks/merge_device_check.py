"""Merges on an accelerator against the CPU: the same adapters, every update-space method, the
relative Frobenius difference of the merged updates and the wall time of each (one run).

    python benchmarks/merge_device_check.py --device cuda --json merge_device.json

The adapters are random rank-16 LoRAs in SmolLM2-135M's q/k/v/o shapes (30 layers, d 576, kv 192),
so the figures say what one D2C merge costs at that size; no model or data is needed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from romscale.adapters.bank import AdapterBank
from romscale.adapters.merge import MergeOptions, merge_adapters
from romscale.adapters.peft_io import adapter_from_factors
from romscale.utils.machine import machine_line
from romscale.utils.outputs import check_target, write_json_output

KIND = "merge-device-check"

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}


def random_bank(n: int, layers: int, rank: int, seed: int) -> AdapterBank:
    g = torch.Generator().manual_seed(seed)
    shared_a = {f"model.layers.{i}.self_attn.{m}": torch.randn(rank, d_in, generator=g) / d_in**0.5
                for i in range(layers) for m, (_, d_in) in SHAPES.items()}  # one A init, as our trainer
    adapters = []
    for t in range(n):
        factors = {name: (a + 0.1 * torch.randn(a.shape, generator=g), 0.02 * torch.randn(SHAPES[name.rsplit(".", 1)[1]][0], rank, generator=g))
                   for name, a in shared_a.items()}
        adapters.append(adapter_from_factors(f"task{t}", {"r": rank, "lora_alpha": rank, "target_modules": list(SHAPES)}, factors))
    return AdapterBank(adapters)


def rel_diff(a, b) -> float:
    num = den = 0.0
    for m in a.modules:
        da, db = a.modules[m].B.double() @ a.modules[m].A.double(), b.modules[m].B.double() @ b.modules[m].A.double()
        num += float((da - db).pow(2).sum())
        den += float(db.pow(2).sum())
    return (num / den) ** 0.5


def incremental(n: int, layers: int, device: str) -> dict:
    """D2C's merge of a cluster one task larger than a kept one (romscale.adapters.ties_sums),
    against the plain merge of the same n + 1 adapters, on `device`."""
    from romscale.adapters.ties_sums import IncrementalTies

    bank = random_bank(n + 1, layers, 16, 0)
    opts = MergeOptions(density=0.5, seed=0, device=None if device == "cpu" else device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    inc = IncrementalTies(bank, opts)
    t0 = time.perf_counter()
    for i in range(n + 1):
        inc.trimmed(i)
    sync()
    trim_s = time.perf_counter() - t0
    inc.merge(bank.names[:n])  # the kept cluster (from scratch)
    t0 = time.perf_counter()
    fast = inc.merge(bank.names)  # its sums plus one task
    sync()
    extended_s = time.perf_counter() - t0
    merge_adapters(bank, "ties", opts)  # warm-up
    t0 = time.perf_counter()
    ref = merge_adapters(bank, "ties", opts).adapter
    sync()
    plain_s = time.perf_counter() - t0
    return {"adapters": n + 1, "trim_every_task_once_s": round(trim_s, 4), "extended_merge_s": round(extended_s, 4),
            "plain_merge_s": round(plain_s, 4), "speedup": round(plain_s / extended_s, 2), "rel_diff": rel_diff(fast, ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tasks", type=int, default=5, help="adapters merged at once (a D2C cluster of 40 tasks at K=8)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    check_target(args.json, kind=KIND, overwrite=True, is_file=True, what="--json")  # before the work, not after
    bank = random_bank(args.tasks, args.layers, 16, 0)
    rows = {}
    for method in ("ties", "task_arithmetic", "dare_ties", "knots"):
        res = {}
        for dev in ("cpu", args.device):
            opts = MergeOptions(density=0.5, seed=0, device=None if dev == "cpu" else dev)
            merge_adapters(bank, method, opts)  # warm-up (kernels, allocator)
            t0 = time.perf_counter()
            out = merge_adapters(bank, method, opts).adapter
            if dev != "cpu":
                torch.cuda.synchronize()
            res[dev] = (out, time.perf_counter() - t0)
        rows[method] = {"cpu_s": round(res["cpu"][1], 4), f"{args.device}_s": round(res[args.device][1], 4),
                        "speedup": round(res["cpu"][1] / res[args.device][1], 2),
                        "rel_diff": rel_diff(res[args.device][0], res["cpu"][0])}
        print(method, rows[method], flush=True)
    rows["ties_incremental"] = incremental(args.tasks, args.layers, args.device)
    print("ties_incremental", rows["ties_incremental"], flush=True)
    write_json_output(args.json, {"command": f"python benchmarks/merge_device_check.py --device {args.device} --tasks {args.tasks}",
                                  "machine": machine_line(), "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                  "tasks": args.tasks, "layers": args.layers, "methods": rows},
                      kind=KIND, overwrite=True)


if __name__ == "__main__":
    main()
