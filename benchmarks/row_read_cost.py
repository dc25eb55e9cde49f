"""What reading a token's ROM table rows costs the native host (romscale.rom.ort_runtime): warm
(page cache hot) through `RomTable.rows` (torch) and `RomTable.rows_np` (numpy), and cold (the
table's pages dropped from the page cache first) with and without the read-ahead advice that
`rows_np` gives (MADV_WILLNEED on the rows' pages before touching them), for one token (a decode
step) and a 16-token prompt. Random token ids; medians over --calls calls (cold: ids never read before).

    python benchmarks/row_read_cost.py --bundle runs/native/meki-d72-fp16 --json results/row_read_cost_cpu.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from romscale.errors import RomscaleError
from romscale.rom.table import RomTable
from romscale.utils.machine import machine_line
from romscale.utils.outputs import check_target, write_json_output

KIND = "row-read-cost"


def median_us(fn, batches: list[np.ndarray], cold: RomTable | None = None) -> float:
    times = []
    for ids in batches:
        if cold is not None:
            cold.drop_cache()
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a romscale MeKi bundle folder (its ROM table is read)")
    ap.add_argument("--calls", type=int, default=200, help="calls per measurement")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    try:
        if args.calls < 1:
            raise RomscaleError(f"--calls must be at least 1; got {args.calls}")
        if args.json:
            check_target(args.json, kind=KIND, overwrite=True, is_file=True, what="--json")  # before the work
        table = RomTable(args.bundle)
    except (RomscaleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        out = measure(table, args.calls)
    finally:
        table.close()
    for key, v in out.items():
        print(f"{key:40s} {v:9.1f} us")
    if args.json:
        write_json_output(args.json, {"command": shlex.join(["python", *sys.argv]), "machine": machine_line(),
                                      "bundle": str(args.bundle), "row_bytes": table.row_bytes, "calls": args.calls,
                                      "us": out}, kind=KIND, overwrite=True, what="row read cost")


def measure(table: RomTable, calls: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    fresh = iter(rng.permutation(table.vocab_size).tolist())
    one = [np.array([[next(fresh)]]) for _ in range(calls)]
    advised = table._prefetch

    def no_advice(ids: list[int]) -> None:  # the reader before the advice: each page faults on its own
        return None

    out = {"warm_1_token_rows_torch": median_us(lambda i: table.rows(torch.from_numpy(i)), [one[0]] * calls),
           "warm_1_token_numpy": median_us(table.rows_np, [one[0]] * calls)}
    for label, prefetch in (("advised", advised), ("unadvised", no_advice)):
        table._prefetch = prefetch
        ones = [np.array([[next(fresh)]]) for _ in range(calls)]
        prompts = [np.array([[next(fresh) for _ in range(16)]]) for _ in range(max(calls // 10, 1))]
        out[f"cold_1_token_{label}"] = median_us(table.rows_np, ones, cold=table)
        out[f"cold_16_token_prompt_{label}"] = median_us(table.rows_np, prompts, cold=table)
    table._prefetch = advised
    return out


if __name__ == "__main__":
    main()
