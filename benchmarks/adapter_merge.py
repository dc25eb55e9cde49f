"""Adapter merging speed and memory on this machine: N synthetic PEFT LoRA adapters shaped like
SmolLM2-135M LoRAs (rank 32 on q/k/v/o of 30 layers; hidden 576, 9 heads, 3 kv heads of 64, so
q/o are 576x576 and k/v 192x576), written as real adapter folders in a temp dir. Every step runs
in its own fresh process so its peak RSS is its own; times exclude process start and imports.

Synthetic factors mimic trained LoRAs of one base and seed (hydraopt.md): A_t = A0 + 0.5 noise
(cosine across tasks ~0.8), B_t = 0.5 B0 + noise (cosine ~0.2). Speed does not depend on values.

    python benchmarks/adapter_merge.py --out results/adapter_merge_cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS, HIDDEN, KV_OUT = 30, 576, 192
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_OUT, HIDDEN), "v_proj": (KV_OUT, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}
MERGES = ["task_arithmetic", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots",
          "linear_ab", "ties_ab", "dare_linear_ab", "dare_ties_ab", "magnitude_prune_ab"]


def make_library(root: Path, n: int, rank: int, layers: int, seed: int = 0) -> list[Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base_A = {(i, m): torch.randn(rank, s[1], generator=g) / s[1] ** 0.5 for i in range(layers) for m, s in SHAPES.items()}
    base_B = {(i, m): torch.randn(s[0], rank, generator=g) * 0.01 for i in range(layers) for m, s in SHAPES.items()}
    paths = []
    for t in range(n):
        tensors = {}
        for (i, m), A0 in base_A.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{pre}.lora_A.weight"] = A0 + 0.5 * torch.randn(A0.shape, generator=g) / A0.shape[1] ** 0.5
            B0 = base_B[(i, m)]
            tensors[f"{pre}.lora_B.weight"] = 0.5 * B0 + torch.randn(B0.shape, generator=g) * 0.01
        cfg = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "r": rank, "lora_alpha": 2 * rank, "target_modules": list(SHAPES), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        }
        d = root / f"task{t:02d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        paths.append(d)
    return paths


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _step(kind: str, arg: str, paths: list[str], out_dir: str, storage: float, queue) -> None:
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        from romscale.adapters.bank import AdapterBank
        from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt
        from romscale.adapters.merge import MergeOptions, merge_adapters
        from romscale.adapters.peft_io import write_peft_adapter
        from romscale.adapters.report import merged_task_errors

        t0 = time.perf_counter()
        bank = AdapterBank.load(paths)
        t_load = time.perf_counter() - t0
        load_before = os.getloadavg()[0]
        c1, t1 = time.process_time(), time.perf_counter()
        if kind == "merge":
            res = merge_adapters(bank, arg, MergeOptions(density=0.5, seed=0))
            t_compute = time.perf_counter() - t1
            write_peft_adapter(res.adapter, Path(out_dir) / arg, overwrite=True, inputs=bank.sources)
            t_total, cpu = time.perf_counter() - t1, time.process_time() - c1
            errs = merged_task_errors(bank, {m: (lm.A, lm.B) for m, lm in res.adapter.modules.items()})  # not timed
            extra = {"family": res.family, **_storage(res.storage, bank.storage()), "mean_task_error": sum(errs) / len(errs)}
        else:
            bundle = fit_hydraopt(bank, HydraOptConfig(storage=storage))
            t_compute = time.perf_counter() - t1
            bundle.save(Path(out_dir) / "hydraopt", overwrite=True, inputs=bank.sources)
            t_total, cpu = time.perf_counter() - t1, time.process_time() - c1
            extra = {
                **_storage(bundle.storage(), bank.storage()),
                "chosen": bundle.fit["chosen"],
                "objective": bundle.fit["objective"],
                "mean_task_error": sum(bundle.fit["task_errors"].values()) / bank.n,
                "n_candidates": len(bundle.fit.get("candidates", [])),
                "search_seconds": bundle.fit["search_seconds"],
            }
        queue.put({"step": f"{kind}:{arg}", "load_s": round(t_load, 3), "compute_s": round(t_compute, 3),
                   "compute_and_write_s": round(t_total, 3), "cpu_s": round(cpu, 3), "loadavg_1min_before": load_before,
                   "peak_rss_bytes": _peak_rss_bytes(), **extra})
    except Exception as exc:  # report, do not hang the parent
        queue.put({"step": f"{kind}:{arg}", "error": repr(exc)})


def _storage(st, lib) -> dict:
    """Storage of an output in both units, and as fractions of the library (fractions of bytes rule)."""
    return {"storage_params": st.params, "storage_bytes": st.bytes, "storage_dtype": st.total.dtype,
            "storage_fraction_params": st.params / lib.params, "storage_fraction_bytes": st.bytes / lib.bytes}


def run_step(kind: str, arg: str, paths: list[Path], out_dir: Path, storage: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_step, args=(kind, arg, [str(x) for x in paths], str(out_dir), storage, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--storage", type=float, default=0.5, help="HydraOpt target, a fraction of the library's bytes")
    ap.add_argument("--methods", default=",".join(MERGES))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--limit-hydraopt-s", type=float, default=60.0)
    ap.add_argument("--limit-merge-s", type=float, default=20.0)
    ap.add_argument("--limit-rss-gb", type=float, default=4.0)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    tmp = Path(tempfile.mkdtemp(prefix="romscale-adapter-bench-"))
    try:
        t0 = time.perf_counter()
        paths = make_library(tmp / "library", args.n, args.rank, args.layers)
        gen_s = time.perf_counter() - t0
        lib_bytes = sum(p.joinpath("adapter_model.safetensors").stat().st_size for p in paths)
        rows = [run_step("hydraopt", f"storage={args.storage}", paths, tmp / "out", args.storage)]
        for m in [x for x in args.methods.split(",") if x]:
            rows.append(run_step("merge", m, paths, tmp / "out", args.storage))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    gb = 1e9  # the limit is in GB (10^9 bytes), stricter than GiB
    for r in rows:
        if "error" in r:
            r["pass"] = False
            continue
        limit = args.limit_hydraopt_s if r["step"].startswith("hydraopt") else args.limit_merge_s
        r["limit_s"] = limit
        r["pass"] = bool(r["compute_and_write_s"] <= limit and r["peak_rss_bytes"] < args.limit_rss_gb * gb)

    table = Table(title=f"{args.n} synthetic SmolLM2-135M-shaped LoRAs (r={args.rank}, q/k/v/o x {args.layers} layers)")
    for col in ("step", "load s", "compute s", "compute+write s", "CPU s", "limit s", "peak RSS GB", "storage (bytes)", "mean task err", "pass"):
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=col == "step")
    for r in rows:
        if "error" in r:
            table.add_row(r["step"], *["-"] * 8, f"error: {r['error']}")
            continue
        table.add_row(r["step"], f"{r['load_s']:.2f}", f"{r['compute_s']:.2f}", f"{r['compute_and_write_s']:.2f}", f"{r['cpu_s']:.1f}",
                      f"{r['limit_s']:.0f}", f"{r['peak_rss_bytes'] / gb:.2f}", f"{r['storage_fraction_bytes']:.3f}",
                      f"{r['mean_task_error']:.3f}", "yes" if r["pass"] else "NO")
    console = Console(width=150)
    console.print(table)
    hyd = rows[0]
    if "chosen" in hyd:
        c = hyd["chosen"]
        console.print(f"HydraOpt chose tree={c['tree']} rho={c['rank_multiplier']}x r, K_A={c['k_a']}, K_B={c['k_b']}: "
                        f"{hyd['storage_fraction_bytes']:.3f} of the library's bytes, mean task error {hyd['mean_task_error']:.3f} "
                        f"({hyd['n_candidates']} candidates searched in {hyd['search_seconds']:.1f} s)")

    result = {
        "benchmark": "adapter_merge",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {
            "description": "2-core CPU, the development container" if (os.cpu_count() or 0) == 2 else f"{os.cpu_count()}-core CPU",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "library": {"n_adapters": args.n, "rank": args.rank, "layers": args.layers, "modules_per_adapter": 4 * args.layers,
                    "shapes_d_out_x_d_in": {k: list(v) for k, v in SHAPES.items()}, "weights_file_bytes": lib_bytes,
                    "generate_seconds": round(gen_s, 2)},
        "limits": {"hydraopt_s": args.limit_hydraopt_s, "merge_s": args.limit_merge_s, "peak_rss_gb": args.limit_rss_gb},
        "timing_note": ("compute_and_write_s (judged against the limits) excludes loading the adapters (load_s) and process "
                        "start; cpu_s is the step's process CPU time (about 2x wall when both cores are free); "
                        "mean_task_error: RMS-over-modules relative update error, averaged over tasks (merges: defaults, density 0.5)"),
        "steps": rows,
        "all_pass": all(r.get("pass") for r in rows),
    }
    if args.out:
        from romscale.utils.outputs import write_json_output

        write_json_output(args.out, result, kind="adapter-merge-benchmark", overwrite=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
