"""Where MeKi's fp32 decode overhead in ONNX Runtime comes from (docs/native_runtime.md).

1. Node counts of the ORT-optimised decode programs, dense vs MeKi (the exports that
   `romscale bundle bench decode --runtime onnxruntime --work runs/native` built).
2. Whether padding the fused first matmul's width to a multiple of 64 pays: 30 chained
   [1, 576] x [576, n] x [n, 576] products at n = 3,072 (dense), 3,144 (MeKi d_mem 72), 3,200.

    python benchmarks/ort_meki_overhead.py [WORK]      # WORK defaults to runs/native
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def node_counts(folder: str) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        o.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        ort.InferenceSession(os.path.join(folder, "decode.onnx"), o, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(o.optimized_model_filepath, load_external_data=False).graph.node)


def chain(n: int, k: int = 576, layers: int = 30) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((k, n), np.float32) * 0.01, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal((n, k), np.float32) * 0.01, f"v{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]), helper.make_node("MatMul", [f"y{i}", f"v{i}"], [f"x{i}"])]
        x = f"x{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, k])], inits)
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), o,
                                providers=["CPUExecutionProvider"])


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else "runs/native"
    dense, meki = node_counts(f"{work}/dense-fp32"), node_counts(f"{work}/meki-d72-fp32")
    print(f"optimised decode nodes: dense {sum(dense.values())}, MeKi {sum(meki.values())}")
    print("  MeKi - dense by op:", {op: meki[op] - dense[op] for op in sorted(set(meki) | set(dense)) if meki[op] != dense[op]})
    x = np.random.default_rng(1).standard_normal((1, 576), np.float32)
    sessions = {n: chain(n) for n in (3072, 3144, 3200)}
    for rep in range(3):  # interleaved repeats: drift lands on every width
        for n, s in sessions.items():
            s.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(50):
                s.run(None, {"x": x})
            print(f"repeat {rep}: n = {n}: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms per chain")


if __name__ == "__main__":
    main()
