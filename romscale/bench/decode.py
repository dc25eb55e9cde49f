"""Batch-1 greedy decoding on this machine: (a) the dense model with the same RAM architecture,
(b) the MeKi deploy bundle with its table on storage (page cache dropped before the series, and in
a second arm before every run), (c) the unfolded training form, and a control: (a) with the same
fused FFN layout and kernel as (b) but no MeKi, which shows what the layout alone is worth. Runs
are interleaved in rotating order; medians of >= 5. Random weights: speed does not depend on their
values.

Memory figures come from separate child processes (one per arm), so neither arm's allocations
pollute the other's: anonymous RSS after loading and generating, and the table's page-cache
residency (mincore) after generating.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.presets import build_model, get_preset
from romscale.rom.fused import fuse_dense_ffn, fuse_meki_ffn
from romscale.rom.kernel import ffn_kernel
from romscale.rom.pagecache import PAGE, drop_file_cache, release_free_memory, rss_anon_bytes
from romscale.rom.runtime import export_bundle, load_bundle
from romscale.rom.table import TABLE_FILE


@dataclass
class DecodeBenchConfig:
    preset: str = "smollm2-135m"
    d_mem: int = 72
    new_tokens: int = 32
    memory_tokens: int = 256  # generated in the memory probes
    runs: int = 9
    prompt_len: int = 8
    table_dtype: str = "fp16"
    prefetch: bool = False
    fused: bool = True
    seed: int = 0
    threads: int | None = None


def _prompt(cfg: DecodeBenchConfig, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))


def _generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )


def _timed(model, prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    _generate(model, prompt, n)
    return n / (time.perf_counter() - start)


def _build(cfg: DecodeBenchConfig, arm: str):
    meki = MekiConfig(d_mem=cfg.d_mem, zero_init_output=False)
    return build_model(cfg.preset, meki, with_meki=arm != "dense", seed=cfg.seed).eval()


def _load_bundle(cfg: DecodeBenchConfig, path: Path):
    bundle = load_bundle(path, prefetch=cfg.prefetch)
    if cfg.fused:
        fuse_meki_ffn(bundle.model)
    return bundle


def rehome_weights(model):
    """Copy every weight into a fresh allocation, in module order. On the reference VM exact copies
    of one model decoded up to 4% apart (benchmarks/placement_bias.py): where the weights land in
    memory matters as much as the effect measured. The benchmark re-places every arm before each
    timed run, so a median is over placements, not one lucky or unlucky allocation."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.clone()
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    setattr(module, name, buf.clone())
    release_free_memory()
    return model


def _touched_bytes(ids: torch.Tensor, row_bytes: int, header: int) -> int:
    """Bytes of whole pages spanned by the rows of the distinct tokens in `ids`."""
    pages: set[int] = set()
    for tok in torch.unique(ids).tolist():
        start = header + tok * row_bytes
        pages.update(range(start // PAGE, (start + row_bytes - 1) // PAGE + 1))
    return len(pages) * PAGE


def _rss_after_generate() -> dict[str, int]:
    """Anonymous RSS as generation left it, and after returning the heap's free pages to the OS
    (malloc_trim): the first is what the process holds, the second what is live."""
    raw = rss_anon_bytes()
    release_free_memory()
    return {"rss_anon_bytes": raw, "rss_anon_bytes_trimmed": rss_anon_bytes()}


def memory_probe(cfg: DecodeBenchConfig, arm: str, bundle_dir: Path | None) -> dict[str, Any]:
    """Run in a child process: load one arm, generate, report memory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vocab = get_preset(cfg.preset).vocab
    prompt = _prompt(cfg, vocab)
    if arm == "dense":
        model = _build(cfg, "dense")
        release_free_memory()  # as load_bundle does: compare steady states, not allocator slack
        _generate(model, prompt, cfg.memory_tokens)
        return _rss_after_generate()
    drop_file_cache(bundle_dir / TABLE_FILE)
    bundle = _load_bundle(cfg, bundle_dir)
    out = _generate(bundle.model, prompt, cfg.memory_tokens)
    m = bundle.table.manifest
    row_bytes = m["tensors"]["table"]["row_bytes"]
    header = m["header_bytes"] + m["tensors"]["table"]["data_offsets"][0]
    touched = _touched_bytes(out, row_bytes, header)
    if "scales" in m["tensors"]:
        e = m["tensors"]["scales"]
        touched += _touched_bytes(out, e["row_bytes"], m["header_bytes"] + e["data_offsets"][0])
    return {
        **_rss_after_generate(),
        "table_resident_bytes": bundle.table.resident_bytes(),
        "touched_rows_bytes": touched,
        "distinct_tokens": int(torch.unique(out).numel()),
    }


def _probe_in_child(cfg: DecodeBenchConfig, arm: str, bundle_dir: Path) -> dict[str, Any]:
    payload = json.dumps({"cfg": asdict(cfg), "arm": arm, "bundle": str(bundle_dir)})
    # Both arms run with glibc's mmap threshold fixed at its default (128 KiB). Left dynamic, it
    # rises to the size of the largest block freed so far, so the fused arm (which frees its
    # pre-fusion weights) kept far more free-but-resident heap from the growing KV cache than the
    # dense arm: allocator slack, not memory MeKi uses.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(
        [sys.executable, "-m", "romscale.bench.decode", payload], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_decode(cfg: DecodeBenchConfig, workdir: Path | None = None, log=print) -> dict[str, Any]:
    if cfg.runs < 5:
        raise ValueError("runs must be >= 5 (medians of at least 5 runs)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = tempfile.TemporaryDirectory(prefix="romscale-bench-", dir=workdir)
    bundle_dir = Path(tmp.name) / "bundle"
    try:
        log(f"building and exporting {cfg.preset} with d_mem={cfg.d_mem} ({cfg.table_dtype} table) ...")
        folded = fold(_build(cfg, "meki"))
        export_bundle(folded, bundle_dir, dtype=cfg.table_dtype)
        del folded
        dense, unfolded = _build(cfg, "dense"), _build(cfg, "meki")
        dense_fused = _build(cfg, "dense")
        fuse_dense_ffn(dense_fused)
        bundle = _load_bundle(cfg, bundle_dir)
        prompt = _prompt(cfg, get_preset(cfg.preset).vocab)
        # "meki": the table's page cache is dropped once before the timed series; "meki_cold":
        # dropped before every one of its runs, so each run reads its rows from storage again.
        arms = {
            "dense": dense,
            "meki": bundle.model,
            "meki_cold": bundle.model,
            "dense_fused": dense_fused,
            "unfolded": unfolded,
        }
        for model in (dense, bundle.model, dense_fused, unfolded):  # warm-up (allocator, first-call paths)
            _timed(model, prompt, 4)
        drop_file_cache(bundle_dir / TABLE_FILE)
        speeds: dict[str, list[float]] = {k: [] for k in arms}
        names = list(arms)
        for r in range(cfg.runs):
            # Rotate the order every run: on a shared VM, the first run after a model switch was
            # measurably slower, and a fixed order would charge that to one arm.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rehome_weights(arms[name])
                if name == "meki_cold":
                    drop_file_cache(bundle_dir / TABLE_FILE)
                speeds[name].append(_timed(arms[name], prompt, cfg.new_tokens))
            log(f"run {r + 1}/{cfg.runs}: " + ", ".join(f"{k} {v[-1]:.2f} tok/s" for k, v in speeds.items()))
        table_bytes = bundle.table.table_bytes
        read_per_token = bundle.table.row_bytes
        bundle.close()
        del arms, dense, dense_fused, unfolded, bundle
        log("memory probes (child processes) ...")
        mem_dense = _probe_in_child(cfg, "dense", bundle_dir)
        mem_meki = _probe_in_child(cfg, "meki", bundle_dir)
    finally:
        tmp.cleanup()
    med = {k: statistics.median(v) for k, v in speeds.items()}
    touched = mem_meki["touched_rows_bytes"]
    return {
        "config": asdict(cfg),
        "dense_tok_s": med["dense"],
        "meki_tok_s": med["meki"],
        "unfolded_tok_s": med["unfolded"],
        "meki_cold_tok_s": med["meki_cold"],
        "dense_fused_tok_s": med["dense_fused"],
        "ratio": med["meki"] / med["dense"],
        "ratio_cold": med["meki_cold"] / med["dense"],
        # Median over runs of (MeKi / dense) in the same run round: robust to slow machine drift.
        "ratio_paired_median": statistics.median(m / d for m, d in zip(speeds["meki"], speeds["dense"])),
        "unfolded_ratio": med["unfolded"] / med["dense"],
        # MeKi against the control with the same fused FFN layout and kernel: the branch's own cost.
        "ratio_vs_dense_fused": med["meki"] / med["dense_fused"],
        "fused_kernel": ffn_kernel() is not None,
        "table_bytes": table_bytes,
        "read_bytes_per_token": read_per_token,
        "touched_rows_bytes": touched,
        "table_resident_bytes": mem_meki["table_resident_bytes"],
        "resident_over_touched": mem_meki["table_resident_bytes"] / max(touched, 1),
        "distinct_tokens": mem_meki["distinct_tokens"],
        "rss_delta_bytes": mem_meki["rss_anon_bytes"] - mem_dense["rss_anon_bytes"],
        "rss_delta_over_table": (mem_meki["rss_anon_bytes"] - mem_dense["rss_anon_bytes"]) / table_bytes,
        "rss_delta_trimmed_bytes": mem_meki["rss_anon_bytes_trimmed"] - mem_dense["rss_anon_bytes_trimmed"],
        "speeds_tok_s": speeds,
        "memory_tokens": cfg.memory_tokens,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":  # child-process entry for memory_probe
    args = json.loads(sys.argv[1])
    result = memory_probe(DecodeBenchConfig(**args["cfg"]), args["arm"], Path(args["bundle"]))
    print(json.dumps(result))
