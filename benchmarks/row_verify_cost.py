"""What checking each ROM table row on read costs: `RomTable.rows` for one token (a decode step's
fetch) and for a 512-token prompt, with row verification (CRC-32 + NaN/Inf check) on and off, on a
SmolLM2-135M-shaped fp16 bundle (d_mem 72, random weights). In-process; on/off interleaved over 7
rounds; medians.

    python benchmarks/row_verify_cost.py --out results/row_verify_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.presets import build_model
from romscale.rom.table import RomTable
from romscale.rom.runtime import export_bundle
from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output


def per_call_us(table: RomTable, ids: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        table.rows(ids)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="romscale-rowcost-") as tmp, torch.no_grad():
        path = export_bundle(fold(build_model("smollm2-135m", MekiConfig(d_mem=72), seed=0)), Path(tmp) / "b")
        table = RomTable(path)
        cases = {"1 token": (torch.randint(0, table.vocab_size, (1, 1), generator=g), 2000),
                 "512 tokens": (torch.randint(0, table.vocab_size, (1, 512), generator=g), 50)}
        results = {}
        for name, (ids, calls) in cases.items():
            table.rows(ids)  # page the rows in
            times = {True: [], False: []}
            for _ in range(args.rounds):
                for verify in (True, False):
                    table.verify_rows = verify
                    times[verify].append(per_call_us(table, ids, calls))
            on, off = statistics.median(times[True]), statistics.median(times[False])
            results[name] = {"verify_on_us": on, "verify_off_us": off, "cost_us": on - off}
            print(f"{name}: rows() {on:.1f} us with verification, {off:.1f} us without: +{on - off:.1f} us")
        table.close()
    write_json_output(args.out, {"command": f"python benchmarks/row_verify_cost.py --out {args.out} --rounds {args.rounds}",
                                 "machine": machine_line(), "bundle": "smollm2-135m, d_mem 72, fp16", "results": results},
                      overwrite=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
