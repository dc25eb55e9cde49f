"""Batch-1 decode on the native runtime, side by side with llama.cpp (`romscale bundle bench decode
--runtime onnxruntime`).

Arms, all on the same weights (the packaged SmolLM2-135M-Instruct, de-quantised from its GGUF):
  llama.cpp   the GGUF re-quantised by llama.cpp itself to the same precision (f32 for fp32 weights,
              q8_0 for int8, f16 for fp16): the anchor; needs `pip install 'romscale[bench]'`
  ort-dense   the native export of the dense model (the control)
  ort-meki    the native export of the same model with MeKi attached and folded (d_mem 72 = d/8), its
              table in a deploy bundle on storage, the page cache dropped before every run
  hf-eager    transformers' generate, eager fp32 (the reference the issue starts from)
Each round runs every arm once (greedy, a fixed prompt, `new_tokens` new tokens, EOS ignored) in the
rotating order of romscale.bench.decode.round_order; speed ratios are paired per round with 95%
t-intervals. Memory is measured in a fresh child process per ORT arm.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romscale.bench.decode import paired_ratio_ci, round_order
from romscale.errors import RomscaleError

__all__ = ["NativeBenchConfig", "bench_native", "native_table"]

GGUF_PRECISION = {"fp32": "f32", "fp16": "f16", "int8": "q8_0"}


@dataclass
class NativeBenchConfig:
    model: str = "smollm2-135m-instruct"
    d_mem: int = 72
    weights: str = "fp32"
    table_dtype: str = "fp16"
    prompt_tokens: int = 16
    new_tokens: int = 64
    rounds: int = 10
    threads: int = 2
    memory_tokens: int = 256
    hf_eager: bool = True
    llamacpp: bool = True
    meki: bool = True  # False: the dense arms only (the main job's short comparison with llama.cpp)
    seed: int = 0


def _prompt(cfg: NativeBenchConfig, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(min(100, vocab // 2), min(vocab, 20000), size=(1, cfg.prompt_tokens), dtype=np.int64)


def _layout(folder: Path) -> str | None:
    """The export's layout version, from its native.json alone: the decoder that opens the export
    later checks every file's hash; hashing the ~0.5 GB program here too would read it twice."""
    from romscale.rom.onnx_export import NATIVE_FILE
    from romscale.utils.outputs import read_json

    meta = read_json(folder / NATIVE_FILE, RomscaleError)
    return meta.get("layout") if isinstance(meta, dict) else None


def prepare(cfg: NativeBenchConfig, work: Path, log=print) -> dict[str, Path]:
    """Build (once; reused from `work`) the dense and MeKi native exports, the MeKi bundle and the
    llama.cpp GGUF."""
    import torch

    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.fold import fold
    from romscale.models import PACKAGED_MODELS, load_causal_lm, packaged_model
    from romscale.rom.onnx_export import LAYOUT, NATIVE_KIND, export_native, export_native_from
    from romscale.rom.runtime import export_bundle, load_bundle
    from romscale.utils.outputs import output_kind

    work.mkdir(parents=True, exist_ok=True)
    paths = {"dense": work / f"dense-{cfg.weights}", "bundle": work / f"meki-d{cfg.d_mem}-{cfg.table_dtype}",
             "meki": work / f"meki-d{cfg.d_mem}-{cfg.weights}"}
    src = packaged_model(cfg.model) if cfg.model in PACKAGED_MODELS else Path(cfg.model)
    if output_kind(paths["dense"]) != NATIVE_KIND or _layout(paths["dense"]) != LAYOUT:
        log(f"exporting the dense model ({cfg.weights}) ...")
        export_native_from(src, paths["dense"], weights=cfg.weights, overwrite=paths["dense"].exists())
    if not cfg.meki:
        del paths["bundle"], paths["meki"]
    elif output_kind(paths["bundle"]) != "meki-bundle":
        log(f"building the MeKi bundle (d_mem {cfg.d_mem}, table {cfg.table_dtype}) ...")
        model, tok = load_causal_lm(src, dtype=torch.float32)
        torch.manual_seed(cfg.seed)
        attach_meki(model, MekiConfig(d_mem=cfg.d_mem, zero_init_output=False))
        export_bundle(fold(model), paths["bundle"], dtype=cfg.table_dtype, tokenizer=tok, overwrite=paths["bundle"].exists())
        del model
    if cfg.meki and (output_kind(paths["meki"]) != NATIVE_KIND or _layout(paths["meki"]) != LAYOUT):  # an older exporter's: again
        log(f"exporting the MeKi model ({cfg.weights}) ...")
        b = load_bundle(paths["bundle"])
        try:
            export_native(b.model, paths["meki"], weights=cfg.weights, bundle=paths["bundle"], overwrite=paths["meki"].exists())
        finally:
            b.close()
    if cfg.llamacpp:
        from romscale.rom.llamacpp import requantize_gguf

        if cfg.model not in PACKAGED_MODELS:
            raise RomscaleError("the llama.cpp arm re-quantises the packaged GGUF: use the packaged model or --no-llamacpp")
        gguf = work / f"llamacpp-{GGUF_PRECISION[cfg.weights]}.gguf"
        if not gguf.is_file():
            from romscale.models import packaged_gguf

            log(f"re-quantising the GGUF to {GGUF_PRECISION[cfg.weights]} with llama.cpp ...")
            requantize_gguf(packaged_gguf(cfg.model), gguf, GGUF_PRECISION[cfg.weights])
        paths["gguf"] = gguf
    paths["hf"] = src
    return paths


class _Arm:
    def __init__(self, name: str, run, closer=None, table=None) -> None:
        self.name, self.run, self.closer, self.table = name, run, closer, table


def _arms(cfg: NativeBenchConfig, paths: dict[str, Path]) -> list[_Arm]:
    from romscale.rom.ort_runtime import OrtDecoder

    arms = []
    if "gguf" in paths:
        from romscale.rom.llamacpp import LlamaCppDecoder

        ll = LlamaCppDecoder(paths["gguf"], threads=cfg.threads, n_ctx=cfg.prompt_tokens + cfg.new_tokens + 64)
        arms.append(_Arm(f"llama.cpp {GGUF_PRECISION[cfg.weights]}", lambda p, n, d=ll: d.greedy(p[0].tolist(), n), ll.close))
    for key, name in (("dense", "ort dense"), ("meki", "ort MeKi")):
        if key not in paths:
            continue
        dec = OrtDecoder(paths[key], threads=cfg.threads)

        def run(p, n, d=dec):
            r = d.generate(p, max_new_tokens=n)
            return r.tokens[0].tolist(), r.ttft_s, r.decode_s

        arms.append(_Arm(name, run, dec.close, dec.table))
    if cfg.hf_eager:
        import torch

        from romscale.models import load_causal_lm

        model, _ = load_causal_lm(paths["hf"], dtype=torch.float32)
        model.eval()
        model.generation_config.eos_token_id = None

        def hf(p, n, m=model):
            return _hf_greedy(m, p, n)

        arms.append(_Arm("hf eager", hf))
    return arms


def _hf_greedy(model: Any, p: np.ndarray, n: int) -> tuple[list[int], float, float]:
    """transformers' eager forward with its KV cache, greedy, EOS ignored: (tokens, ttft_s, decode_s)."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.from_numpy(p), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        toks, past = [int(nxt)], out.past_key_values
        for _ in range(n - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
    return toks, first - t0, time.perf_counter() - first


def _probe(kind: str, path: str, prompt: list[int], n: int, threads: int, queue) -> None:
    """In a fresh process: load one native arm, generate, report resident memory."""
    from romscale.rom.ort_runtime import OrtDecoder
    from romscale.rom.pagecache import rss_anon_bytes, rss_bytes

    try:
        dec = OrtDecoder(path, threads=threads)
        p = np.asarray([prompt], np.int64)
        dec.generate(p, max_new_tokens=4)  # warm: ORT's arenas reach their size
        after_drop = None
        if dec.table is not None:
            dec.table.drop_cache()
            # pages another mapping holds cannot be dropped and would count as this run's: reported
            after_drop = dec.table.resident_bytes()
        before = rss_anon_bytes()
        r = dec.generate(p, max_new_tokens=n)
        out: dict[str, Any] = {"rss_anon_before_bytes": before, "rss_anon_after_bytes": rss_anon_bytes(),
                               "rss_total_bytes": rss_bytes(), "peak_rss_bytes": rss_bytes("VmHWM")}
        if dec.table is not None:
            import torch

            from romscale.bench.decode import _touched_bytes

            ids = np.unique(np.concatenate([p[0], r.tokens[0]]))
            # touched: the whole pages holding the rows read, as the PyTorch runtime's benchmark counts
            # them (not the row checksums: read once at open into RAM, their pages went with the drop
            # after the warm-up); rows_bytes: the rows' own bytes
            out.update(table_bytes=dec.table.table_bytes, table_resident_bytes=dec.table.resident_bytes(),
                       table_resident_after_drop_bytes=after_drop,
                       touched_rows_bytes=_touched_bytes(torch.from_numpy(ids), dec.table.manifest, checksums=False),
                       rows_bytes=int(ids.size) * dec.table.row_bytes, distinct_tokens=int(ids.size),
                       row_bytes_per_token=dec.table.row_bytes)
        dec.close()
        queue.put(out)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which must not hang
        queue.put({"error": repr(exc)})


def _in_child(target, *args) -> dict[str, Any]:
    """Run target(*args, queue) in a fresh (spawned) process and return what it put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q))
    proc.start()
    import queue as queue_mod

    while True:  # a child that died without reporting must not hang the benchmark
        try:
            out = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                out = {"error": f"the child process exited with code {proc.exitcode} without a report"}
                break
    proc.join()
    return out


def bench_native(cfg: NativeBenchConfig, work: Path, log=print) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if cfg.weights not in GGUF_PRECISION:
        raise RomscaleError(f"--weights must be one of {', '.join(GGUF_PRECISION)}; got {cfg.weights!r}")
    paths = prepare(cfg, work, log)
    import torch

    torch.set_num_threads(cfg.threads)
    arms = _arms(cfg, paths)
    import json

    vocab = json.loads((paths["hf"] / "config.json").read_text())["vocab_size"] if (paths["hf"] / "config.json").is_file() else 49152
    prompt = _prompt(cfg, vocab)
    speeds: dict[str, list[float]] = {a.name: [] for a in arms}
    ttft: dict[str, list[float]] = {a.name: [] for a in arms}
    tokens: dict[str, list[int]] = {}
    try:
        for a in arms:  # one warm-up run each (first-call allocations, lazy initialisation)
            tokens[a.name] = a.run(prompt, cfg.new_tokens)[0]
        by_name = {a.name: a for a in arms}
        for r in tqdm(range(cfg.rounds), desc="paired rounds", disable=None):
            for name in round_order(list(by_name), r):
                a = by_name[name]
                if a.table is not None:
                    a.table.drop_cache()  # the table comes from storage on every run
                _, t_first, t_decode = a.run(prompt, cfg.new_tokens)
                speeds[name].append((cfg.new_tokens - 1) / t_decode)
                ttft[name].append(t_first)
    finally:
        for a in arms:
            if a.closer is not None:
                a.closer()
    lockstep = _lockstep(cfg, paths, prompt) if cfg.meki else None
    names = list(speeds)
    summary = {n: {"tok_s_mean": float(np.mean(v)), "tok_s_all": v, "ttft_s_median": float(np.median(ttft[n])),
                   "ttft_s_all": ttft[n]} for n, v in speeds.items()}
    ratios = {}
    if "ort MeKi" in speeds:
        ratios["ort MeKi / ort dense"] = paired_ratio_ci(speeds["ort MeKi"], speeds["ort dense"])
    if lockstep is not None:
        ratios["ort MeKi / ort dense (lockstep)"] = paired_ratio_ci(lockstep["ort MeKi"], lockstep["ort dense"])
        for order, part in lockstep["by_open_order"].items():
            if part["ratio"] is not None:  # each half alone: how much the opening order moves it
                ratios[f"ort MeKi / ort dense (lockstep, {order})"] = part["ratio"]
    ll = next((n for n in names if n.startswith("llama.cpp")), None)
    if ll:
        ratios[f"ort dense / {ll}"] = paired_ratio_ci(speeds["ort dense"], speeds[ll])
        if "ort MeKi" in speeds:
            ratios[f"ort MeKi / {ll}"] = paired_ratio_ci(speeds["ort MeKi"], speeds[ll])
    if "hf eager" in speeds:
        ratios["ort dense / hf eager"] = paired_ratio_ci(speeds["ort dense"], speeds["hf eager"])
    agree = {n: float(np.mean(np.asarray(t[: cfg.new_tokens]) == np.asarray(tokens["ort dense"][: cfg.new_tokens])))
             for n, t in tokens.items()}
    targets: dict[str, Any] = {}
    if not cfg.meki:  # no table: the memory probes and the MeKi targets are about it
        if ll:
            ci = ratios[f"ort dense / {ll}"]
            targets["dense_ge_0.8x_llamacpp"] = {"ratio": ci["ratio"], "ci_low": ci["ci_low"], "met": ci["ci_low"] >= 0.8}
        return {"config": asdict(cfg), "arms": summary, "ratios": ratios, "greedy_agreement_with_ort_dense": agree,
                "memory": {}, "targets": targets, "paths": {k: str(v) for k, v in paths.items()},
                "threads": cfg.threads, "cpu_count": os.cpu_count()}
    log("memory probes (fresh processes) ...")
    memory = {k: _in_child(_probe, k, paths[k], prompt[0].tolist(), cfg.memory_tokens, cfg.threads) for k in ("dense", "meki")}
    m = memory["meki"]
    for key, name in (("ort MeKi / ort dense", "meki_ge_0.97x_dense"), ("ort MeKi / ort dense (lockstep)", "meki_ge_0.97x_dense_lockstep")):
        if key in ratios:
            ci = ratios[key]
            targets[name] = {"ratio": ci["ratio"], "ci_low": ci["ci_low"], "met": ci["ci_low"] >= 0.97}
    if ll:
        ci = ratios[f"ort dense / {ll}"]
        targets["dense_ge_0.8x_llamacpp"] = {"ratio": ci["ratio"], "ci_low": ci["ci_low"], "met": ci["ci_low"] >= 0.8}
    targets["ttft_16_tokens_le_1s"] = {"ttft_s": summary["ort MeKi"]["ttft_s_median"], "met": summary["ort MeKi"]["ttft_s_median"] <= 1.0}
    if "table_resident_bytes" in m:
        targets["table_residency_le_2x_touched"] = {"ratio": m["table_resident_bytes"] / m["touched_rows_bytes"],
                                                    "met": m["table_resident_bytes"] <= 2 * m["touched_rows_bytes"]}
        # Both arms grow by their KV cache over the same tokens; what the table adds is the difference.
        growth = m["rss_anon_after_bytes"] - m["rss_anon_before_bytes"]
        dense = memory["dense"]["rss_anon_after_bytes"] - memory["dense"]["rss_anon_before_bytes"]
        targets["anon_rss_growth_le_5pct_table"] = {
            "growth_bytes": growth, "dense_growth_bytes": dense, "table_bytes": m["table_bytes"],
            "fraction_of_table": growth / m["table_bytes"], "beyond_dense_fraction": (growth - dense) / m["table_bytes"],
            "met": growth - dense <= 0.05 * m["table_bytes"]}
    return {"config": asdict(cfg), "arms": summary, "ratios": ratios, "greedy_agreement_with_ort_dense": agree,
            "lockstep_tok_s": lockstep, "memory": memory, "targets": targets, "paths": {k: str(v) for k, v in paths.items()},
            "threads": cfg.threads, "cpu_count": os.cpu_count()}


LOCKSTEP_ARMS = ("ort dense", "ort MeKi")


def _lockstep(cfg: NativeBenchConfig, paths: dict[str, Path], prompt: np.ndarray) -> dict[str, Any]:
    """ORT dense and ORT MeKi decoded token by token in alternation (which goes first alternates per
    round), each step timed on its own: drift of the machine (clock, other processes) hits both arms
    at the same tokens, so the per-round ratio is much tighter than that of whole runs one after the
    other. Returns each arm's decode tok/s per round (the prefill step is left out, as in the runs).

    Half of the rounds run in a fresh process that opens the dense decoder first, half in one that
    opens the MeKi decoder first. Why: in one process the decoder opened second decoded ~1 % faster,
    whichever it was (12-round checks on the 2-core AMD EPYC: MeKi / dense 0.969-0.978 with the dense
    decoder opened first, 0.945-0.957 with MeKi first; likewise with a throw-away decoder opened
    before both, with huge pages, and with a shared thread pool), so a fixed order biases the ratio.
    """
    first = (cfg.rounds + 1) // 2
    out: dict[str, Any] = {k: [] for k in LOCKSTEP_ARMS}
    out["by_open_order"] = {}
    for order, rounds in ((LOCKSTEP_ARMS, first), (LOCKSTEP_ARMS[::-1], cfg.rounds - first)):
        if rounds == 0:
            continue
        got = _in_child(_lockstep_child, {k: str(paths["dense" if k == "ort dense" else "meki"]) for k in order},
                        prompt.tolist(), rounds, cfg.new_tokens, cfg.threads)
        if "error" in got:
            raise RomscaleError(f"the lockstep run ({order[0]} opened first) failed: {got['error']}")
        for k in LOCKSTEP_ARMS:
            out[k] += got[k]
        out["by_open_order"][f"{order[0]} opened first"] = {
            **{k: got[k] for k in LOCKSTEP_ARMS},
            "ratio": paired_ratio_ci(got["ort MeKi"], got["ort dense"]) if rounds > 1 else None}
    return out


def _lockstep_child(folders: dict[str, str], prompt: list[list[int]], rounds: int, new_tokens: int, threads: int,
                    queue) -> None:
    """In a fresh process: open the decoders in the order of `folders`, then `rounds` lockstep rounds."""
    from romscale.rom.ort_runtime import OrtDecoder

    decs: dict[str, Any] = {}
    try:
        p = np.asarray(prompt, np.int64)
        # spin=False: with spinning on, the idle threads of one session spun while the other ran and
        # halved both arms' speed (13.5 vs 25.8 tok/s per arm in an 8-round check on session 6's Xeon)
        for k, folder in folders.items():
            decs[k] = OrtDecoder(folder, threads=threads, spin=False)
        out: dict[str, list[float]] = {k: [] for k in decs}
        for d in decs.values():  # warm-up
            list(d.greedy_steps(p, 4))
        for r in range(rounds):
            decs["ort MeKi"].table.drop_cache()
            order = round_order(list(decs), r)
            gens = {k: decs[k].greedy_steps(p, new_tokens) for k in order}
            total = {k: 0.0 for k in order}
            for i in range(new_tokens):
                for k in order:
                    _, dt = next(gens[k])
                    if i > 0:
                        total[k] += dt
            for k in order:
                out[k].append((new_tokens - 1) / total[k])
        queue.put(out)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which must not hang
        queue.put({"error": repr(exc)})
    finally:
        for d in decs.values():
            d.close()


def native_table(result: dict[str, Any], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("arm", "tok/s (mean)", "TTFT median (s)", "greedy = ort dense (dense arms)"):
        t.add_column(col, justify="right")
    for name, s in result["arms"].items():
        same = "" if "MeKi" in name else f"{100 * result['greedy_agreement_with_ort_dense'][name]:.0f}%"  # MeKi changes the model
        t.add_row(name, f"{s['tok_s_mean']:.1f}", f"{s['ttft_s_median']:.3f}", same)
    for name, ci in result["ratios"].items():
        t.add_row(name, f"{ci['ratio']:.3f}x", f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]", f"n={ci['n']}")
    return t


def quick_native_speed(dense: Any, meki_folded: Any, work: Path, *, new_tokens: int = 64, rounds: int = 5,
                       threads: int = 2, prompt_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """The main job's small version: the demo's dense and folded MeKi models exported natively
    (MeKi through a deploy bundle, table fp16 on storage) and decoded in paired rounds next to HF
    eager. No llama.cpp here: the demo's model has no GGUF (the full benchmark uses SmolLM2)."""

    from romscale.rom.onnx_export import export_native
    from romscale.rom.ort_runtime import OrtDecoder
    from romscale.rom.runtime import export_bundle, load_bundle

    bundle = export_bundle(meki_folded, work / "bundle", dtype="fp16")
    b = load_bundle(bundle)
    try:
        t0 = time.perf_counter()
        export_native(b.model, work / "native-meki", bundle=bundle)
        export_native(dense, work / "native-dense")
        export_s = time.perf_counter() - t0
    finally:
        b.close()
    vocab = dense.config.vocab_size
    prompt = np.random.default_rng(seed).integers(1, vocab, size=(1, prompt_tokens), dtype=np.int64)
    decs = {"ort dense": OrtDecoder(work / "native-dense", threads=threads), "ort MeKi": OrtDecoder(work / "native-meki", threads=threads)}
    dense.eval()

    speeds: dict[str, list[float]] = {"ort dense": [], "ort MeKi": [], "hf eager": []}
    try:
        for d in decs.values():
            d.generate(prompt, max_new_tokens=4)  # warm-up
        for r in range(rounds):
            for name in round_order(list(speeds), r):
                if name == "hf eager":
                    _, _, dt = _hf_greedy(dense, prompt, new_tokens)
                else:
                    if decs[name].table is not None:
                        decs[name].table.drop_cache()
                    dt = decs[name].generate(prompt, max_new_tokens=new_tokens).decode_s
                speeds[name].append((new_tokens - 1) / dt)
    finally:
        for d in decs.values():
            d.close()
    return {"export_seconds": round(export_s, 1), "new_tokens": new_tokens, "rounds": rounds,
            "tok_s_mean": {k: float(np.mean(v)) for k, v in speeds.items()},
            "ratios": {"ort MeKi / ort dense": paired_ratio_ci(speeds["ort MeKi"], speeds["ort dense"]),
                       "ort dense / hf eager": paired_ratio_ci(speeds["ort dense"], speeds["hf eager"])}}
