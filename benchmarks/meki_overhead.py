"""MeKi overhead on this machine: training-step time (forward + backward) of dense vs the MeKi
training form, and forward time of dense vs the folded MeKi form, as ratios of medians over
interleaved runs in one process. Random weights (speed does not depend on their values).

    python benchmarks/meki_overhead.py --out results/meki_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from romscale.meki.fold import fold
from romscale.meki.params import parameter_report
from romscale.meki.presets import build_model, get_preset
from romscale.utils.outputs import write_json_output


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_preset(name: str, batch: int, seq: int, runs: int, seed: int = 0) -> dict:
    p = get_preset(name)
    dense = build_model(name, with_meki=False, seed=seed)
    meki = build_model(name, seed=seed)  # same seed: identical base weights plus MeKi
    ids = torch.randint(0, p.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))

    def train_step(model):
        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        return step

    def forward(model):
        def fwd():
            with torch.no_grad():
                model(input_ids=ids)

        return fwd

    times: dict[str, list[float]] = {k: [] for k in ("dense_train", "meki_train", "dense_fwd", "meki_folded_fwd")}
    dense.train(), meki.train()
    for fn in (train_step(dense), train_step(meki)):  # warm-up
        fn()
    for _ in range(runs):  # interleaved, so drift in machine load hits both arms alike
        times["dense_train"].append(_time(train_step(dense)))
        times["meki_train"].append(_time(train_step(meki)))
    report_train = parameter_report(meki)
    fold(meki)
    dense.eval(), meki.eval()
    for fn in (forward(dense), forward(meki)):
        fn()
    for _ in range(runs):
        times["dense_fwd"].append(_time(forward(dense)))
        times["meki_folded_fwd"].append(_time(forward(meki)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": name,
        "batch": batch,
        "seq_len": seq,
        "runs": runs,
        "d_mem": p.d_mem,
        "params_training_form": report_train,
        "params_folded": parameter_report(meki),
        "median_seconds": med,
        "times_seconds": times,
        "train_step_ratio_meki_over_dense": med["meki_train"] / med["dense_train"],
        "forward_ratio_folded_over_dense": med["meki_folded_fwd"] / med["dense_fwd"],
    }


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/meki_overhead_cpu.json"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--presets", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be at least 5 (medians of >= 5 runs)")
    results = [bench_preset(name, args.batch, args.seq, args.runs) for name in args.presets]
    table = Table(title=f"MeKi overhead, batch {args.batch} x {args.seq} tokens, median of {args.runs} (CPU)")
    table.add_column("preset", no_wrap=True)
    for col in ("d_mem", "dense train s", "MeKi train s", "train ratio", "dense fwd s", "folded fwd s", "fwd ratio"):
        table.add_column(col, justify="right")
    for r in results:
        m = r["median_seconds"]
        table.add_row(
            r["preset"],
            str(r["d_mem"]),
            f"{m['dense_train']:.4f}",
            f"{m['meki_train']:.4f}",
            f"{r['train_step_ratio_meki_over_dense']:.3f}",
            f"{m['dense_fwd']:.4f}",
            f"{m['meki_folded_fwd']:.4f}",
            f"{r['forward_ratio_folded_over_dense']:.3f}",
        )
    Console().print(table)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    write_json_output(args.out, {"command": command, "machine": machine(), "results": results}, overwrite=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
