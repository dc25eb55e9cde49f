"""How long romscale takes to start, on this machine: `romscale --help`, `romscale meki info
--preset meki-1.7b`, and `load_bundle` of a SmolLM2-135M-shaped bundle (fp16 table, d_mem 72),
each in fresh processes, median of N after one warm-up (so the page cache is warm).

    python benchmarks/startup.py --json results/startup_cpu.json [--runs 5] [--cache-dir DIR] [--rebuild]

Targets: --help < 1 s, meki info < 3 s, load_bundle < 2 s (the call itself, after torch, romscale
and transformers' Llama modeling code are imported; a second call in the same process, the
imports' times, the process wall time and `python -c "import torch"` are reported next to it). The bundle is
built once (random weights, folded, exported) and kept under --cache-dir; it is rebuilt when
missing, when it no longer loads (the format changed) or with --rebuild.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output

PRESET, D_MEM, TABLE_DTYPE = "smollm2-135m", 72, "fp16"
TARGETS_S = {"romscale --help": 1.0, "romscale meki info --preset meki-1.7b": 3.0, "load_bundle (call)": 2.0}

# Run in a fresh interpreter: prints the seconds of its stages as JSON on the last line.
LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from romscale.rom.runtime import load_bundle
t2 = time.perf_counter()
import transformers.models.llama.modeling_llama  # what the first load_bundle call imports anyway
t3 = time.perf_counter()
b = load_bundle(sys.argv[1])
t4 = time.perf_counter()
b.close()
del b
t5 = time.perf_counter()
b = load_bundle(sys.argv[1])
t6 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "import_runtime_s": t2 - t1, "import_modeling_s": t3 - t2,
                  "load_bundle_s": t4 - t3, "load_bundle_second_s": t6 - t5}))
"""

def romscale_exe() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim), else PATH's."""
    here = Path(sys.executable).parent / "romscale"
    if here.is_file() and os.access(here, os.X_OK):
        return [str(here)]
    found = shutil.which("romscale")
    if found is None:
        sys.exit("romscale is not installed as a command (pip install -e .)")
    return [found]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return wall, proc.stdout


def measure(cmd: list[str], runs: int) -> dict:
    timed(cmd)  # warm-up: page cache, .pyc files
    walls = [timed(cmd)[0] for _ in range(runs)]
    return {"command": " ".join(cmd), "median_s": statistics.median(walls), "runs_s": walls}


def build_bundle(folder: Path) -> float:
    import torch

    from romscale.meki.config import MekiConfig
    from romscale.meki.fold import fold
    from romscale.meki.presets import build_model
    from romscale.rom.runtime import export_bundle

    start = time.perf_counter()
    with torch.no_grad():
        model = build_model(PRESET, MekiConfig(d_mem=D_MEM), seed=0).eval()
        fold(model)
        export_bundle(model, folder, dtype=TABLE_DTYPE, overwrite=True)
    return time.perf_counter() - start


def load_once(folder: Path) -> dict:
    wall, out = timed([sys.executable, "-c", LOAD_SNIPPET, str(folder)])
    stages = json.loads(out.strip().splitlines()[-1])
    return {"process_wall_s": wall, **stages}


def measure_load(folder: Path, runs: int, rebuild: bool) -> dict:
    built_s = None
    if rebuild or not folder.is_dir():
        built_s = build_bundle(folder)
    try:
        load_once(folder)  # warm-up; also tells whether the cached bundle still loads
    except RuntimeError as exc:
        if built_s is not None:
            raise
        print(f"cached bundle {folder} does not load ({str(exc)[-200:]}); rebuilding", file=sys.stderr)
        built_s = build_bundle(folder)
        load_once(folder)
    samples = [load_once(folder) for _ in range(runs)]
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"bundle": str(folder), "preset": PRESET, "d_mem": D_MEM, "table_dtype": TABLE_DTYPE,
            "bundle_bytes": sizes, "build_s": built_s, "median_s": med, "runs": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (replaced if it is a previous run's)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "romscale" / "bench")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached bundle")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    exe = romscale_exe()
    cli = {
        "romscale --help": measure([*exe, "--help"], args.runs),
        "romscale meki info --preset meki-1.7b": measure([*exe, "meki", "info", "--preset", "meki-1.7b"], args.runs),
    }
    context = {
        "python -c pass": measure([sys.executable, "-c", "pass"], args.runs),
        "python -c 'import torch'": measure([sys.executable, "-c", "import torch"], args.runs),
    }
    load = measure_load(args.cache_dir / f"startup-{PRESET}-d{D_MEM}-{TABLE_DTYPE}.bundle", args.runs, args.rebuild)

    rows = [(name, r["median_s"], TARGETS_S[name]) for name, r in cli.items()]
    rows.append(("load_bundle (call)", load["median_s"]["load_bundle_s"], TARGETS_S["load_bundle (call)"]))
    rows.append(("  load_bundle again, same process", load["median_s"]["load_bundle_second_s"], None))
    rows.append(("  import romscale.rom.runtime (after torch)", load["median_s"]["import_runtime_s"], None))
    rows.append(("  import transformers' Llama modeling code", load["median_s"]["import_modeling_s"], None))
    rows.append(("  load_bundle process, wall", load["median_s"]["process_wall_s"], None))
    rows += [(name, r["median_s"], None) for name, r in context.items()]

    machine = machine_line()
    print(f"startup times, median of {args.runs} after one warm-up ({machine})")
    print(f"{'what':<46} {'median s':>9} {'target s':>9}  ")
    for name, sec, target in rows:
        verdict = "" if target is None else ("ok" if sec < target else "MISSED")
        print(f"{name:<46} {sec:>9.3f} {'' if target is None else f'{target:.1f}':>9}  {verdict}")

    if args.json is not None:
        result = {
            "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
            "machine": machine,
            "runs": args.runs,
            "targets_s": TARGETS_S,
            "met": {name: sec < target for name, sec, target in rows if target is not None},
            "cli": cli,
            "load_bundle": load,
            "context": context,
        }
        write_json_output(args.json, result, kind="startup-benchmark", overwrite=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
