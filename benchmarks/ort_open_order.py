"""How much the order in which two ONNX Runtime sessions are opened moves their speed ratio
(docs/native_runtime.md, session 13): the batch-1 decode programs (decode.onnx) of two native
exports, each opened first in its own fresh process, then timed step by step in alternation on the
same fixed inputs (a 32-position KV cache of random values, the same token); medians.

    python benchmarks/ort_open_order.py runs/native/dense-fp32 runs/native/meki-d72-fp32
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np


def child(first: str, second: str, steps: int) -> None:
    import onnxruntime as ort

    def session(folder: str) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = 2, 1
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")  # two sessions take turns
        return ort.InferenceSession(f"{folder}/decode.onnx", o, providers=["CPUExecutionProvider"])

    sessions = {first: session(first), second: session(second)}
    rng = np.random.default_rng(0)
    p = 32
    feeds = {"input_ids": np.array([[500]]), "attention_mask": np.ones((1, p + 1), np.int64),
             "position_ids": np.array([[p]]), "rows": rng.standard_normal((1, 1, 1 << 16)).astype(np.float32)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    inputs = {}
    for k, s in sessions.items():
        f = {}
        for i in s.get_inputs():
            if i.name in ("past_k", "past_v"):
                layers, _, heads, _, dim = i.shape
                f[i.name] = rng.standard_normal((layers, 1, heads, p, dim)).astype(np.float32)
            elif i.name == "rows":
                f[i.name] = feeds["rows"][..., : i.shape[-1]] * 0.1
            else:
                f[i.name] = feeds[i.name]
        inputs[k] = f
        for _ in range(10):
            s.run(None, f)
    for it in range(steps):
        for k in (first, second) if it % 2 else (second, first):
            t0 = time.perf_counter()
            sessions[k].run(None, inputs[k])
            times[k].append(time.perf_counter() - t0)
    print(np.median(times[first]), np.median(times[second]))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) != 3:
        print("usage: python benchmarks/ort_open_order.py EXPORT_A EXPORT_B", file=sys.stderr)
        sys.exit(2)
    a, b = sys.argv[1:]
    med = {}
    for first, second in ((a, b), (b, a)):
        out = subprocess.run([sys.executable, __file__, "--child", first, second, "200"], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"error: {first} / {second}: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            sys.exit(2)
        t_first, t_second = (float(x) for x in out.stdout.split())
        med[(first, second)] = {first: t_first, second: t_second}
        print(f"{first} opened first: {t_first * 1e3:.2f} ms; {second}: {t_second * 1e3:.2f} ms; "
              f"speed {b} / {a} = {med[(first, second)][a] / med[(first, second)][b]:.4f}")
    both = [m[a] / m[b] for m in med.values()]
    print(f"speed {b} / {a}, geometric mean of the two orders: {float(np.sqrt(both[0] * both[1])):.4f}")


if __name__ == "__main__":
    main()
