"""Where a decode step's time goes, dense (as built, and with the fused FFN layout and kernel) vs
the MeKi bundle: per-layer time of the FFN (with MeKi, for the bundle) and of attention, measured in
place inside `generate()` with forward hooks, for three forms of the bundle's FFN: the C kernel (the default), the same fused layout in eager PyTorch
(no kernel), and the unfused hook path. Timing hooks cost the same on every arm. Interleaved
rounds; per-arm medians and medians of per-round ratios to dense.

    python benchmarks/decode_profile.py --out results/decode_profile_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from romscale.bench.decode import DecodeBenchConfig, _build, _generate, _prompt, rehome_weights
from romscale.meki.fold import fold
from romscale.meki.presets import get_preset
from romscale.rom.fused import FusedMekiMLP, fuse_dense_ffn, fuse_meki_ffn
from romscale.rom.runtime import export_bundle, load_bundle
from romscale.utils.outputs import write_json_output
from romscale.utils.machine import machine_line

PARTS = ("ffn", "attn", "forward")


class PartTimer:
    """Accumulates wall time spent inside each layer's FFN and attention and the whole forward."""

    def __init__(self, model) -> None:
        self.total = dict.fromkeys(PARTS, 0.0)
        self._start: dict[str, float] = {}
        for layer in model.get_decoder().layers:
            self._wrap(layer.mlp, "ffn")
            self._wrap(layer.self_attn, "attn")
        self._wrap(model, "forward")

    def _wrap(self, module, part: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._start.__setitem__(part, time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(part))

    def _add(self, part: str) -> None:
        self.total[part] += time.perf_counter() - self._start[part]

    def reset(self) -> None:
        self.total = dict.fromkeys(PARTS, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--d-mem", type=int, default=72)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    cfg = DecodeBenchConfig(d_mem=args.d_mem, new_tokens=args.new_tokens)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="romscale-profile-") as tmp:
        path = export_bundle(fold(_build(cfg, "meki")), Path(tmp) / "bundle")
        arms = {"dense": rehome_weights(_build(cfg, "dense"))}
        dense_fused = _build(cfg, "dense")
        fuse_dense_ffn(dense_fused)  # the control: the same fused layout and kernel, no MeKi
        arms["dense_fused"] = rehome_weights(dense_fused)
        for form in ("kernel", "fused_eager", "hooks"):
            model = load_bundle(path).model
            if form != "hooks":
                fuse_meki_ffn(model)
            if form == "fused_eager":
                for m in model.modules():
                    if isinstance(m, FusedMekiMLP):
                        m.kernel = None
            arms[f"meki_{form}"] = rehome_weights(model)
        timers = {name: PartTimer(model) for name, model in arms.items()}
        prompt = _prompt(cfg, get_preset(cfg.preset).vocab)
        for model in arms.values():
            _generate(model, prompt, 4)
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in arms}
        names = list(arms)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                timers[name].reset()
                start = time.perf_counter()
                _generate(arms[name], prompt, cfg.new_tokens)
                rows[name].append({**timers[name].total, "total": time.perf_counter() - start})
            console.print(f"round {r + 1}/{args.rounds}")
    layers = get_preset(cfg.preset).layers
    calls = cfg.new_tokens  # forward calls per generate: 1 prefill + new_tokens - 1 decode steps
    result = {"command": "python benchmarks/decode_profile.py " + f"--out {args.out} --d-mem {args.d_mem} --rounds {args.rounds} --new-tokens {args.new_tokens}",
              "machine": machine_line(), "d_mem": args.d_mem, "layers": layers, "forward_calls": calls, "arms": {}}
    table = Table(title=f"per-layer time per forward call, us (median of {args.rounds}; {machine_line()})")
    for col in ("arm", "FFN (+MeKi)", "attention", "forward", "generate ratio to dense", "FFN ratio to dense"):
        table.add_column(col, justify="right")
    for name in names:
        med = {k: statistics.median(x[k] for x in rows[name]) for k in (*PARTS, "total")}
        ratio = {k: statistics.median(a[k] / b[k] for a, b in zip(rows[name], rows["dense"])) for k in (*PARTS, "total")}
        per_layer = {k: med[k] / calls / layers * 1e6 for k in ("ffn", "attn")}
        result["arms"][name] = {"median_s": med, "ratio_to_dense": ratio, "per_layer_us": per_layer}
        table.add_row(name, f"{per_layer['ffn']:.1f}", f"{per_layer['attn']:.1f}", f"{med['forward'] / calls * 1e3:.2f} ms",
                      f"{ratio['total']:.3f}", f"{ratio['ffn']:.3f}")
    console.print(table)
    write_json_output(args.out, result, overwrite=True)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
