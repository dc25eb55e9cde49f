"""ExecuTorch (XNNPACK, fp32) vs ONNX Runtime (CPU EP, fp32) on a random-weight SmolLM2-135M-shaped Llama.

Same process, same model, measured interleaved (ET run, ORT run, ...) so that the ratio means something
on a busy machine. Decode protocol = romscale.rom.ort_runtime.OrtDecoder.generate: prefill of the
16-token prompt in one call -> first token (ttft), then 31 one-token steps (decode_s); tok/s = 31 / decode_s.

Usage (in a separate venv: python -m venv /tmp/etv; /tmp/etv/bin/pip install torch==2.13.0 executorch==1.5.1 "transformers>=5" onnxruntime==1.30.0 onnx):
    /tmp/etv/bin/python benchmarks/executorch_vs_ort.py [--layers 30] [--threads 2] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--prompt", type=int, default=16)
ap.add_argument("--new", type=int, default=32)
ap.add_argument("--max-cache", type=int, default=64)
ap.add_argument("--out", default="/tmp/etbench/out")
ap.add_argument("--static-prefill", action="store_true", help="export T=1 only (prefill token by token)")
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(args.threads)
res: dict = {"args": vars(args)}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


from transformers import LlamaConfig, LlamaForCausalLM, GenerationConfig

cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=True, use_cache=True)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval().float()
model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                           cache_config={"batch_size": 1, "max_cache_len": args.max_cache})
P, N = args.prompt, args.new
prompt = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(1))

# ---------------- reference: eager HF greedy (dynamic cache) ----------------
with torch.no_grad():
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False,
                         min_new_tokens=N, cache_implementation="dynamic")[0, P:].tolist()
res["ref_tokens"] = ref
log("eager ref", ref[:8])

# ---------------- ExecuTorch export ----------------
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache
from executorch.exir import to_edge_transform_and_lower, EdgeCompileConfig
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

pte = out / f"llama{args.layers}.pte"
t0 = time.perf_counter()
wrapper = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=args.max_cache)
dyn_ok = not args.static_prefill
with torch.no_grad():
    if dyn_ok:
        T = torch.export.Dim("T", min=1, max=args.max_cache - 1)
        try:
            ep = torch.export.export(wrapper, args=(), kwargs={"input_ids": prompt[:, :4], "cache_position": torch.arange(4)},
                                     dynamic_shapes={"input_ids": {1: T}, "cache_position": {0: T}}, strict=True)
        except Exception as e:  # noqa: BLE001
            log("dynamic export FAILED:", type(e).__name__, str(e)[:2000])
            res["dynamic_export_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            dyn_ok = False
    if not dyn_ok:
        ep = torch.export.export(wrapper, args=(), kwargs={"input_ids": prompt[:, :1], "cache_position": torch.arange(1)},
                                 strict=True)
t_export = time.perf_counter() - t0
log(f"torch.export {t_export:.1f}s dynamic={dyn_ok}")
t1 = time.perf_counter()
edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                   compile_config=EdgeCompileConfig(_check_ir_validity=False))
t_lower = time.perf_counter() - t1
t2 = time.perf_counter()
et_prog = edge.to_executorch()
pte.write_bytes(et_prog.buffer)
t_emit = time.perf_counter() - t2
# what got delegated
gm = edge.exported_program().graph_module
n_deleg = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
non_deleg = {}
for n in gm.graph.nodes:
    if n.op == "call_function" and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target):
        non_deleg[str(n.target)] = non_deleg.get(str(n.target), 0) + 1
res["et_export"] = {"torch_export_s": round(t_export, 1), "lower_s": round(t_lower, 1), "to_executorch_s": round(t_emit, 1),
                    "total_s": round(time.perf_counter() - t0, 1), "dynamic_T": dyn_ok, "pte_MB": round(pte.stat().st_size / 2**20, 1),
                    "delegate_calls": n_deleg, "non_delegated_ops": non_deleg}
log("ET export", res["et_export"])
del ep, edge, et_prog

# ---------------- ONNX export (romscale recipe: TorchScript exporter, past_k/past_v in, present out) ----------------
from torch import nn


class _Step(nn.Module):
    def __init__(self, model, layers):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, past_k, past_v):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past_k[i], past_v[i], i)
        o = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = o.past_key_values
        return (o.logits[:, -1], torch.stack([kv.layers[i].keys for i in range(self.layers)]),
                torch.stack([kv.layers[i].values for i in range(self.layers)]))


onnx_path = out / f"llama{args.layers}.onnx"
t0 = time.perf_counter()
L, KVH, HD = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
kv = torch.zeros(L, 1, KVH, 2, HD)
oargs = (torch.ones(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), torch.arange(2, 5).unsqueeze(0), kv, kv.clone())
names = ["input_ids", "attention_mask", "position_ids", "past_k", "past_v"]
axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "tokens"}, "past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
        "logits": {0: "batch"}, "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}}
model.generation_config.cache_implementation = None
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(_Step(model, L), oargs, str(onnx_path), dynamo=False, input_names=names,
                      output_names=["logits", "present_k", "present_v"], dynamic_axes=axes, opset_version=18)
res["ort_export_s"] = round(time.perf_counter() - t0, 1)
log("ONNX export", res["ort_export_s"], "s")

# ---------------- runtimes ----------------
from executorch.extension.pybindings import portable_lib as pl
from executorch.runtime import Runtime
import onnxruntime as ort

pl._unsafe_reset_threadpool(args.threads)
log("ET threadpool threads:", pl._threadpool_get_thread_count())
rt = Runtime.get()
t0 = time.perf_counter()
et_method = rt.load_program(pte).load_method("forward")
res["et_load_s"] = round(time.perf_counter() - t0, 2)

so = ort.SessionOptions()
so.intra_op_num_threads = args.threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
t0 = time.perf_counter()
sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
res["ort_load_s"] = round(time.perf_counter() - t0, 2)


def run_et():
    ids = prompt
    toks = []
    t0 = time.perf_counter()
    if dyn_ok:
        logits = et_method.execute([ids, torch.arange(P)])[0][:, -1]
    else:
        for i in range(P):
            logits = et_method.execute([ids[:, i:i + 1], torch.tensor([i])])[0][:, -1]
    nxt = int(logits.argmax(-1))
    toks.append(nxt)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(N - 1):
        logits = et_method.execute([torch.tensor([[nxt]]), torch.tensor([P + i])])[0][:, -1]
        nxt = int(logits.argmax(-1))
        toks.append(nxt)
    return toks, ttft, time.perf_counter() - t1


def ort_step(ids, mask, past):
    t = ids.shape[1]
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -t:]
    io = sess.io_binding()
    io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
    io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, np.int64))
    io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
    io.bind_ortvalue_input("past_k", past[0])
    io.bind_ortvalue_input("past_v", past[1])
    for n in ("logits", "present_k", "present_v"):
        io.bind_output(n, "cpu")
    sess.run_with_iobinding(io)
    lg, k, v = io.get_outputs()
    return lg.numpy(), (k, v)


def run_ort():
    ids = prompt.numpy()
    mask = np.ones_like(ids)
    z = np.zeros((L, 1, KVH, 0, HD), np.float32)
    past = (ort.OrtValue.ortvalue_from_numpy(z), ort.OrtValue.ortvalue_from_numpy(z.copy()))
    toks = []
    t0 = time.perf_counter()
    logits, past = ort_step(ids, mask, past)
    nxt = int(logits.argmax(-1)[0])
    toks.append(nxt)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(N - 1):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        logits, past = ort_step(np.array([[nxt]], np.int64), mask, past)
        nxt = int(logits.argmax(-1)[0])
        toks.append(nxt)
    return toks, ttft, time.perf_counter() - t1


# warm-up (1 each), then interleaved timed runs
for fn in (run_et, run_ort):
    fn()
rows = {"et": [], "ort": []}
for r in range(args.runs):
    for name, fn in (("et", run_et), ("ort", run_ort)):
        toks, ttft, dec = fn()
        rows[name].append({"ttft_s": round(ttft, 4), "decode_s": round(dec, 4), "decode_tok_s": round((N - 1) / dec, 2),
                           "match_ref": toks == ref, "first_mismatch": next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), None)})
        log(name, r, rows[name][-1])
res["runs"] = rows
for name in rows:
    v = [x["decode_tok_s"] for x in rows[name]]
    res[f"{name}_decode_tok_s_median"] = float(np.median(v))
    res[f"{name}_ttft_s_median"] = float(np.median([x["ttft_s"] for x in rows[name]]))
res["ratio_et_over_ort_decode"] = round(res["et_decode_tok_s_median"] / res["ort_decode_tok_s_median"], 3)
log(json.dumps({k: v for k, v in res.items() if k not in ("ref_tokens",)}, indent=1))
(out / f"result_L{args.layers}.json").write_text(json.dumps(res, indent=1))
