"""ONNX Runtime's own profiler on two native exports: kernel time per decode step by op type.

    python benchmarks/ort_profile.py runs/native/dense-fp32 runs/native/meki-d72-fp32 --tokens 64

Runs one greedy generation (an 8-token prompt, `--tokens` new tokens) per export with profiling on,
and prints, per op type, the microseconds and the count per step (prefill included, divided by the
number of steps). Profiled times are inflated for small ops; compare the two columns, not the sum
with a wall-clock step."""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from romscale.rom.onnx_export import PROGRAM_FILE
from romscale.rom.ort_runtime import OrtDecoder


def profile(folder: Path, tokens: int, threads: int) -> tuple[collections.Counter, collections.Counter]:
    dec = OrtDecoder(folder, threads=threads)
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        dec.session = ort.InferenceSession(str(folder / PROGRAM_FILE), opts, providers=["CPUExecutionProvider"])
        if dec.decode_session is not None:  # the static decode program serves the batch-1 decode steps
            dec.decode_session = ort.InferenceSession(str(folder / dec.meta["decode_program"]), opts,
                                                      providers=["CPUExecutionProvider"])
        dec.generate(np.array([[1, 504, 3456, 77, 901, 12, 5, 9]], np.int64), max_new_tokens=tokens)
        events = json.loads(Path(dec.session.end_profiling()).read_text())
        if dec.decode_session is not None:
            events += json.loads(Path(dec.decode_session.end_profiling()).read_text())
    finally:
        dec.close()
    us, n = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            us[e["args"]["op_name"]] += e["dur"]
            n[e["args"]["op_name"]] += 1
    return us, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", type=Path, nargs=2, help="two export folders (romscale bundle native)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    (ua, na), (ub, nb) = (profile(f, args.tokens, args.threads) for f in args.exports)
    steps = args.tokens  # the prefill run and tokens - 1 decode runs
    a, b = (f.name for f in args.exports)
    print(f"{'op':30s} {a + ' us':>16s} {b + ' us':>16s} {a + ' n':>14s} {b + ' n':>14s}")
    for op in sorted(set(ua) | set(ub), key=lambda o: -max(ua[o], ub[o])):
        print(f"{op:30s} {ua[op] / steps:16.0f} {ub[op] / steps:16.0f} {na[op] // steps:14d} {nb[op] // steps:14d}")
    print(f"{'all kernels':30s} {sum(ua.values()) / steps:16.0f} {sum(ub.values()) / steps:16.0f}")


if __name__ == "__main__":
    main()
