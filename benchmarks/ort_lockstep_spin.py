"""ORT dense and MeKi decoded in lockstep (token-interleaved, each step timed) and as whole runs,
with ONNX Runtime's thread spinning on or off: the check behind the lockstep's spin=False
(docs/native_runtime.md). Needs the exports of `romscale bundle bench decode --runtime onnxruntime
--work runs/native` (runs/native/dense-fp32, runs/native/meki-d72-fp32).

    python benchmarks/ort_lockstep_spin.py 0   # spinning off
    python benchmarks/ort_lockstep_spin.py 1   # spinning on (ONNX Runtime's default)
"""
import sys, numpy as np
from romscale.rom.ort_runtime import OrtDecoder
from romscale.bench.decode import paired_ratio_ci
spin = sys.argv[1] == "1"
d = OrtDecoder("runs/native/dense-fp32", spin=spin); m = OrtDecoder("runs/native/meki-d72-fp32", spin=spin)
p = np.random.default_rng(0).integers(100, 20000, (1, 16))
for x in (d, m): list(x.greedy_steps(p, 4))
ls = {"d": [], "m": []}; rs = {"d": [], "m": []}
for r in range(8):
    m.table.drop_cache()
    order = ["d", "m"] if r % 2 == 0 else ["m", "d"]
    g = {"d": d.greedy_steps(p, 64), "m": m.greedy_steps(p, 64)}; tot = {"d": 0.0, "m": 0.0}
    for i in range(64):
        for k in order:
            _, dt = next(g[k]); tot[k] += dt if i else 0
    for k in order: ls[k].append(63 / tot[k])
    for k in order:
        if k == "m": m.table.drop_cache()
        rs[k].append(63 / (d if k == "d" else m).generate(p, max_new_tokens=64).decode_s)
print("spin", spin, "lockstep", np.mean(ls["d"]), np.mean(ls["m"]), paired_ratio_ci(ls["m"], ls["d"]))
print("spin", spin, "runs", np.mean(rs["d"]), np.mean(rs["m"]), paired_ratio_ci(rs["m"], rs["d"]))
