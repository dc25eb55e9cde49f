"""Does the HF eager arm of `romscale bundle bench decode --runtime onnxruntime` move the ORT dense /
llama.cpp ratio? The same dense-only benchmark (packaged SmolLM2-135M-Instruct, fp32, 64 new tokens,
paired rounds in rotating order) without and with the HF eager arm in the rotation; no MeKi arms.

    python benchmarks/native_anchor_arms.py --rounds 30 --json results/native_anchor_arms_cpu.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from romscale.bench.native import NativeBenchConfig, bench_native
from romscale.errors import RomscaleError
from romscale.utils.machine import machine_line
from romscale.utils.outputs import check_target, write_json_output

KIND = "native-anchor-arms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    try:
        if args.rounds < 2:
            raise RomscaleError(f"--rounds must be at least 2; got {args.rounds}")
        if args.json:
            check_target(args.json, kind=KIND, overwrite=True, is_file=True, what="--json")  # before the work
        out = {}
        with tempfile.TemporaryDirectory(prefix="romscale-anchor-") as tmp:  # both runs share the export and the GGUF
            for hf in (False, True):
                cfg = NativeBenchConfig(weights="fp32", rounds=args.rounds, new_tokens=64, meki=False, hf_eager=hf, llamacpp=True)
                r = bench_native(cfg, Path(tmp), log=lambda *a: None)
                key = "with_hf_eager" if hf else "without_hf_eager"
                out[key] = {"tok_s": {k: v["tok_s_mean"] for k, v in r["arms"].items()},
                            "ort_dense_over_llamacpp": r["ratios"]["ort dense / llama.cpp f32"]}
                ci = out[key]["ort_dense_over_llamacpp"]
                print(f"{key:18s} " + ", ".join(f"{k} {v:.1f}" for k, v in out[key]["tok_s"].items())
                      + f"; ort dense / llama.cpp {ci['ratio']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]", flush=True)
    except RomscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        write_json_output(args.json, {"command": shlex.join(["python", *sys.argv]), "machine": machine_line(),
                                      "rounds": args.rounds, **out}, kind=KIND, overwrite=True, what="anchor arms")


if __name__ == "__main__":
    main()
