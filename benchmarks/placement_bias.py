"""Does where a model's weights sit in memory change its decode speed? Times batch-1 greedy decoding
of the same dense model (a) as transformers built it and (b) as an exact copy of it in fresh
allocations (what `romscale bench decode` does to every arm), interleaved, in one process. Same
weights, same code: any gap is placement, and it bounds what a single decode ratio can resolve.

    python benchmarks/placement_bias.py --out results/placement_bias_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from romscale.bench.decode import DecodeBenchConfig, _build, _generate, _prompt, rehome_weights
from romscale.meki.presets import get_preset
from romscale.utils.outputs import write_json_output
from romscale.utils.machine import machine_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    cfg = DecodeBenchConfig(new_tokens=args.new_tokens)
    built = _build(cfg, "dense")
    arms = {"as_built": built, "copy_a": rehome_weights(copy.deepcopy(built)), "copy_b": rehome_weights(copy.deepcopy(built))}
    prompt = _prompt(cfg, get_preset(cfg.preset).vocab)
    for model in arms.values():
        _generate(model, prompt, 4)
    secs: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            _generate(arms[name], prompt, cfg.new_tokens)
            secs[name].append(time.perf_counter() - start)
    ratio = {k: statistics.median(a / b for a, b in zip(secs[k], secs["as_built"])) for k in names}
    result = {
        "command": f"python benchmarks/placement_bias.py --out {args.out} --rounds {args.rounds} --new-tokens {args.new_tokens}",
        "machine": machine_line(),
        "median_s": {k: statistics.median(v) for k, v in secs.items()},
        "time_ratio_to_as_built": ratio,
        "seconds": secs,
    }
    Console().print({k: round(v, 4) for k, v in ratio.items()}, f"(time ratio to as_built, median of {args.rounds} rounds)")
    write_json_output(args.out, result, overwrite=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
