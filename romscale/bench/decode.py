"""Batch-1 greedy decoding on this machine, as speed ratios with 95% confidence intervals.

Arms: (a) "dense", the dense model with the same RAM architecture as transformers builds it;
(b) "meki", the MeKi deploy bundle with its table on storage and the fused decode path (its table's
page cache warm: dropped once before the warm-up, so the timed runs find the rows the prompt reads
cached); (c) "dense_fused", the control: (a) with the same fused FFN layout and kernel as (b) but no
MeKi, which shows what the layout alone is worth; (d) "unfolded", the training form (optional).
And a cold sub-series: "meki_cold", the bundle with the table's page cache dropped before every one
of its runs, paired with its own dense and dense_fused runs.

Method. A round re-places every arm's weights in fresh allocations (rehome_weights: placement alone
moved one model's speed by up to 4%), then runs every arm on the same prompt. With
`interleave="token"` (the default) the arms decode in lockstep: one greedy token each, in turn, the
order alternating token by token, each decode step timed on its own (the prefill untimed), so every
arm's steps are spread over the same seconds and the machine's drift cancels in the ratios. With
`interleave="run"` each arm generates its `new_tokens` in one generate() call after the other. The
arms' order rotates and alternates from round to round (ABC, CBA, BCA, ACB, ...). Per round the
ratios meki/dense and meki/dense_fused (tok/s over tok/s, the same round) are taken; each ratio is
reported as the geometric mean over rounds with a t-interval on the log ratios
(`paired_ratio_ci`). Rounds continue past `min_pairs` until both CI half-widths are <=
`target_halfwidth`, or `max_pairs` rounds, or `max_seconds`; the result records which fired.
Random weights: speed does not depend on their values. The bundle is loaded as deployed, every
table row verified against its checksum on fetch (load_bundle's verify_rows).

Memory figures come from separate child processes (one per arm), so neither arm's allocations
pollute the other's: anonymous RSS after loading and generating, and the table's page-cache
residency (mincore) after generating.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.presets import build_model, get_preset
from romscale.rom.fused import fuse_dense_ffn, fuse_meki_ffn
from romscale.rom.kernel import ffn_kernel
from romscale.rom.pagecache import PAGE, drop_file_cache, release_free_memory, rss_anon_bytes, rss_bytes
from romscale.rom.runtime import export_bundle, load_bundle
from romscale.rom.table import TABLE_FILE

STOP_REASONS = ("target_halfwidth", "max_pairs", "max_seconds")


@dataclass
class DecodeBenchConfig:
    preset: str = "smollm2-135m"
    """Model shape (romscale.meki.presets); random weights."""
    d_mem: int = 72
    """MeKi memory width of the bundle."""
    new_tokens: int = 32
    """Tokens generated in every timed run (greedy, batch 1)."""
    memory_tokens: int = 256
    """Tokens generated in the memory probes (child processes)."""
    min_pairs: int = 10
    """Rounds run before the stop rule is consulted (>= 2: a t-interval needs two)."""
    max_pairs: int = 60
    """Most warm rounds; stops the series if the CIs have not narrowed to target_halfwidth."""
    target_halfwidth: float = 0.015
    """Stop once the 95% CI half-widths of meki/dense and meki/dense_fused are both at most this
    (a fraction of the ratio: 0.015 is +-1.5%)."""
    max_seconds: float | None = None
    """Wall-clock budget of the warm series (checked after each round, once min_pairs are done);
    None: no limit. The cold sub-series runs its cold_rounds in addition."""
    cold_rounds: int = 10
    """Rounds of the cold sub-series (dense, dense_fused, meki_cold; the table's page cache dropped
    before each meki_cold run); 0 skips it, else >= 2."""
    unfolded: bool = True
    """Time the unfolded training form in every warm round (one more run per round)."""
    confidence: float = 0.95
    """Confidence level of the intervals."""
    interleave: str = "token"
    """"token": in each round the arms decode in lockstep, one token each in turn (the order
    alternating token by token), each step timed on its own: arms are compared over the same
    seconds, so the machine's drift cancels in the ratios. "run": each arm generates its
    new_tokens in one generate() call, one arm after the other (wider intervals on a shared VM)."""
    prompt_len: int = 8
    table_dtype: str = "fp16"
    prefetch: bool = False
    """load_bundle's prefetch (read the whole table into the page cache up front)."""
    fused: bool = True
    """Use the fused FFN + MeKi decode path for the bundle (the dense_fused control always is)."""
    seed: int = 0
    threads: int | None = None
    """torch threads; None: torch's default."""

    def validate(self) -> None:
        if self.min_pairs < 2:
            raise ValueError("min_pairs must be >= 2 (a confidence interval needs two rounds)")
        if self.max_pairs < self.min_pairs:
            raise ValueError(f"max_pairs ({self.max_pairs}) must be >= min_pairs ({self.min_pairs})")
        if not 0 < self.target_halfwidth < 1:
            raise ValueError("target_halfwidth is a fraction of the ratio, between 0 and 1 (e.g. 0.015)")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive (or None for no limit)")
        if self.cold_rounds != 0 and self.cold_rounds < 2:
            raise ValueError("cold_rounds must be 0 (no cold sub-series) or >= 2")
        if not 0 < self.confidence < 1:
            raise ValueError("confidence must be between 0 and 1")
        if self.interleave not in ("token", "run"):
            raise ValueError(f"interleave must be 'token' or 'run', got {self.interleave!r}")
        if self.new_tokens < 1 or self.memory_tokens < 1 or self.prompt_len < 1:
            raise ValueError("new_tokens, memory_tokens and prompt_len must be >= 1")


def paired_ratio_ci(num_speeds: Sequence[float], den_speeds: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Geometric mean of the paired ratios num[i] / den[i] and its t-interval.

    The interval is mean(log r) +- t_{(1+confidence)/2, n-1} * sd(log r) / sqrt(n), mapped back with
    exp: ci_low <= ratio <= ci_high, asymmetric around the ratio. `halfwidth` is exp(t * se) - 1,
    the larger relative distance from the ratio to either end (ci_high / ratio - 1); the interval
    lies within ratio * (1 +- halfwidth)."""
    from scipy.stats import t as t_dist

    if len(num_speeds) != len(den_speeds):
        raise ValueError(f"paired series of different lengths: {len(num_speeds)} and {len(den_speeds)}")
    n = len(num_speeds)
    if n < 2:
        raise ValueError("a confidence interval needs at least two pairs")
    if not all(v > 0 and math.isfinite(v) for v in (*num_speeds, *den_speeds)):
        raise ValueError("speeds must be positive and finite")
    logs = [math.log(a / b) for a, b in zip(num_speeds, den_speeds)]
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    se = sd / math.sqrt(n)
    half_log = float(t_dist.ppf((1 + confidence) / 2, n - 1)) * se
    return {
        "ratio": math.exp(mean),
        "ci_low": math.exp(mean - half_log),
        "ci_high": math.exp(mean + half_log),
        "halfwidth": math.expm1(half_log),
        "n": n,
        "confidence": confidence,
        "log_sd": sd,
        "per_round": [math.exp(x) for x in logs],
    }


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The arms' order in round r: rotated by r // 2, reversed in odd rounds (ABC, CBA, BCA, ACB,
    CAB, BAC for three). Over 2k rounds each of k arms runs in every position twice, and each pair
    of arms in both orders: the first run after a model switch was measurably slower on a shared VM,
    and a fixed order would charge that to one arm."""
    k = (r // 2) % len(names)
    order = list(names[k:]) + list(names[:k])
    return order[::-1] if r % 2 else order


def stop_reason(cis: Sequence[dict[str, Any]], rounds: int, seconds: float, cfg: DecodeBenchConfig) -> str | None:
    """Which stop condition holds after `rounds` rounds (None: run another round)."""
    if rounds < cfg.min_pairs:
        return None
    if all(ci["halfwidth"] <= cfg.target_halfwidth for ci in cis):
        return "target_halfwidth"
    if rounds >= cfg.max_pairs:
        return "max_pairs"
    if cfg.max_seconds is not None and seconds >= cfg.max_seconds:
        return "max_seconds"
    return None


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


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


@torch.no_grad()
def _lockstep(arms: dict[str, Any], order: Sequence[str], prompt: torch.Tensor, n: int, before_run) -> dict[str, float]:
    """Greedy-decode `n` tokens with every arm in turn, one token each, timing each decode step
    alone; returns tok/s per arm (n over the sum of its step times). The order alternates from token
    to token (order, reversed, order, ...) so no arm always runs right after the same neighbour.
    The prompt's prefill is not timed: the quantity compared is the per-token decode step."""
    state = {}
    for name in order:
        before_run(name)
        out = arms[name](input_ids=prompt, use_cache=True)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    spent = {name: 0.0 for name in order}
    for step in range(n):
        for name in order if step % 2 == 0 else order[::-1]:
            cache, tok = state[name]
            start = time.perf_counter()
            out = arms[name](input_ids=tok, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            spent[name] += time.perf_counter() - start
            state[name] = (out.past_key_values, nxt)
    return {name: n / t for name, t in spent.items()}


def _build(cfg: DecodeBenchConfig, arm: str):
    meki = MekiConfig(d_mem=cfg.d_mem, zero_init_output=False)
    return build_model(cfg.preset, meki, with_meki=arm != "dense", seed=cfg.seed).eval()


def _load_bundle(cfg: DecodeBenchConfig, path: Path):
    # verify_rows: every row checked against its checksum on fetch, as a deployed bundle runs.
    bundle = load_bundle(path, prefetch=cfg.prefetch, verify_rows=True)
    if cfg.fused:
        fuse_meki_ffn(bundle.model)
    return bundle


def rehome_weights(model):
    """Copy every weight into a fresh allocation, in module order. On the reference VM exact copies
    of one model decoded up to 4% apart (benchmarks/placement_bias.py): where the weights land in
    memory matters as much as the effect measured. The benchmark re-places every arm before each
    timed run, so each round's speeds (and the ratios over rounds) span placements, not one lucky or
    unlucky allocation."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.clone()
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    setattr(module, name, buf.clone())
    release_free_memory()
    return model


def _touched_bytes(ids: torch.Tensor, manifest: dict[str, Any], checksums: bool = True) -> int:
    """Bytes of the table file's whole pages that reading the rows of the distinct tokens in `ids`
    touches: each token's row of every per-token tensor (table, int8 scales), and all of the row
    checksums ("row_crc32"), which opening the table reads and checks in full (`checksums=False`:
    for a reader whose cache was dropped after the open, which keeps its own copy of them)."""
    pages: set[int] = set()

    def span(start: int, stop: int) -> None:
        pages.update(range(start // PAGE, (stop - 1) // PAGE + 1))

    toks = torch.unique(ids).tolist()
    for name, e in manifest["tensors"].items():
        base = manifest["header_bytes"] + e["data_offsets"][0]
        if name == "row_crc32":
            if checksums:
                span(base, manifest["header_bytes"] + e["data_offsets"][1])
            continue
        for tok in toks:
            span(base + tok * e["row_bytes"], base + (tok + 1) * e["row_bytes"])
    return len(pages) * PAGE


def _rss_after_generate() -> dict[str, int]:
    """Resident memory as generation left it, and after returning the heap's free pages to the OS
    (malloc_trim): the first is what the process holds, the second what is live. Total RSS counts
    too, not only anonymous memory: a bundle's RAM weights are memory-mapped from
    model.safetensors (file-backed), the dense arm's are heap."""
    raw, total = rss_anon_bytes(), rss_bytes()
    release_free_memory()
    return {"rss_anon_bytes": raw, "rss_anon_bytes_trimmed": rss_anon_bytes(), "rss_total_bytes": total,
            "rss_total_bytes_trimmed": rss_bytes()}


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
    touched = _touched_bytes(out, bundle.table.manifest)
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


def _series(
    arms: dict[str, Any], names: Sequence[str], pairs: Sequence[tuple[str, str]], cfg: DecodeBenchConfig,
    prompt: torch.Tensor, before_run, log, label: str, rounds: int | None = None,
) -> dict[str, Any]:
    """Rounds of every arm in `names` once (round_order), until stop_reason fires, or for exactly
    `rounds` rounds if given. `pairs`: the (numerator, denominator) arms of the ratios;
    `before_run(name)` runs after the arm's weights are re-placed, right before its timed run."""
    speeds: dict[str, list[float]] = {k: [] for k in names}
    orders: list[list[str]] = []
    cis: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    reason = None
    while reason is None:
        order = round_order(names, len(orders))
        if cfg.interleave == "token":
            for name in order:
                rehome_weights(arms[name])
            for name, v in _lockstep(arms, order, prompt, cfg.new_tokens, before_run).items():
                speeds[name].append(v)
        else:
            for name in order:
                rehome_weights(arms[name])
                before_run(name)
                speeds[name].append(_timed(arms[name], prompt, cfg.new_tokens))
        orders.append(order)
        n = len(orders)
        if n >= 2:
            cis = {f"{a}/{b}": paired_ratio_ci(speeds[a], speeds[b], cfg.confidence) for a, b in pairs}
        if rounds is None:
            reason = stop_reason(list(cis.values()), n, time.perf_counter() - start, cfg)
        elif n >= rounds:
            reason = "rounds"
        ci_text = "".join(f", {k} {c['ratio']:.3f} +-{c['halfwidth']:.1%}" for k, c in cis.items())
        log(f"{label} round {n}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in speeds.items()) + f" tok/s{ci_text}")
    return {"speeds": speeds, "orders": orders, "cis": cis, "stop": reason, "seconds": time.perf_counter() - start}


def bench_decode(cfg: DecodeBenchConfig, workdir: Path | None = None, log=print) -> dict[str, Any]:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = tempfile.TemporaryDirectory(prefix="romscale-bench-", dir=workdir)
    bundle_dir = Path(tmp.name) / "bundle"
    try:
        log(f"building and exporting {cfg.preset} with d_mem={cfg.d_mem} ({cfg.table_dtype} table) ...")
        folded = fold(_build(cfg, "meki"))
        export_bundle(folded, bundle_dir, dtype=cfg.table_dtype)
        del folded
        dense = _build(cfg, "dense")
        dense_fused = _build(cfg, "dense")
        fuse_dense_ffn(dense_fused)
        unfolded = _build(cfg, "meki") if cfg.unfolded else None
        bundle = _load_bundle(cfg, bundle_dir)
        prompt = _prompt(cfg, get_preset(cfg.preset).vocab)
        arms = {"dense": dense, "dense_fused": dense_fused, "meki": bundle.model}
        if unfolded is not None:
            arms["unfolded"] = unfolded
        # "meki" is the warm arm: the cache is dropped once, before the warm-up, which reads the
        # prompt's rows from storage; every timed run then finds the rows it reads cached.
        bundle.table.drop_cache()
        for model in arms.values():  # warm-up (allocator, first-call paths)
            _timed(model, prompt, 4)
        warm = _series(
            arms, list(arms), [("meki", "dense"), ("meki", "dense_fused")], cfg, prompt, lambda name: None,
            log, "warm",
        )
        cold, cold_arms = None, {}
        if cfg.cold_rounds:
            cold_arms = {"dense": dense, "dense_fused": dense_fused, "meki_cold": bundle.model}

            def drop_before_meki(name: str, table=bundle.table) -> None:
                if name == "meki_cold":  # after rehome_weights, right before the timed run
                    table.drop_cache()  # the pages this reader mapped too

            cold = _series(
                cold_arms, list(cold_arms), [("meki_cold", "dense"), ("meki_cold", "dense_fused")], cfg, prompt,
                drop_before_meki, log, "cold", rounds=cfg.cold_rounds,
            )
        table_bytes = bundle.table.table_bytes
        read_per_token = bundle.table.row_bytes
        bundle.close()
        del arms, cold_arms, dense, dense_fused, unfolded, bundle  # the probes run in children
        log("memory probes (child processes) ...")
        mem_dense = _probe_in_child(cfg, "dense", bundle_dir)
        mem_meki = _probe_in_child(cfg, "meki", bundle_dir)
    finally:
        tmp.cleanup()
    ws = warm["speeds"]
    ratios = {
        "meki_over_dense": warm["cis"]["meki/dense"],
        "meki_over_dense_fused": warm["cis"]["meki/dense_fused"],
    }
    if cfg.unfolded:
        ratios["unfolded_over_dense"] = paired_ratio_ci(ws["unfolded"], ws["dense"], cfg.confidence)
    if cold is not None:
        ratios["cold_meki_over_dense"] = cold["cis"]["meki_cold/dense"]
        ratios["cold_meki_over_dense_fused"] = cold["cis"]["meki_cold/dense_fused"]
    touched = mem_meki["touched_rows_bytes"]
    ram_delta = mem_meki["rss_total_bytes_trimmed"] - mem_meki["table_resident_bytes"] - mem_dense["rss_total_bytes_trimmed"]
    cold_gm = {k: _geomean(v) for k, v in cold["speeds"].items()} if cold is not None else {}

    def r(key: str) -> float | None:
        return ratios[key]["ratio"] if key in ratios else None

    return {
        "config": asdict(cfg),
        # Per-arm speeds: geometric means over the warm rounds, so that meki_tok_s / dense_tok_s is
        # `ratio` (the geometric mean of the paired ratios); the cold arm's over the cold rounds.
        "dense_tok_s": _geomean(ws["dense"]),
        "meki_tok_s": _geomean(ws["meki"]),
        "dense_fused_tok_s": _geomean(ws["dense_fused"]),
        "unfolded_tok_s": _geomean(ws["unfolded"]) if cfg.unfolded else None,
        "meki_cold_tok_s": cold_gm.get("meki_cold"),
        "ratio": r("meki_over_dense"),
        "ratio_vs_dense_fused": r("meki_over_dense_fused"),
        "ratio_cold": r("cold_meki_over_dense"),
        "ratio_cold_vs_dense_fused": r("cold_meki_over_dense_fused"),
        "unfolded_ratio": r("unfolded_over_dense"),
        "ratios": ratios,  # each: ratio, ci_low, ci_high, halfwidth, n, confidence, log_sd, per_round
        "rounds": len(warm["orders"]),
        "stop_reason": warm["stop"],  # one of STOP_REASONS
        "series_seconds": round(warm["seconds"], 1),
        "speeds_tok_s": ws,  # per arm, one entry per warm round
        "orders": warm["orders"],  # the arms' order in each warm round
        "cold_rounds": len(cold["orders"]) if cold is not None else 0,
        "cold_speeds_tok_s": cold["speeds"] if cold is not None else {},
        "cold_orders": cold["orders"] if cold is not None else [],
        "cold_series_seconds": round(cold["seconds"], 1) if cold is not None else 0.0,
        "verify_rows": True,  # the bundle checked every table row on fetch (load_bundle)
        "fused_kernel": ffn_kernel() is not None,
        "table_bytes": table_bytes,
        "read_bytes_per_token": read_per_token,
        "touched_rows_bytes": touched,
        "table_resident_bytes": mem_meki["table_resident_bytes"],
        "resident_over_touched": mem_meki["table_resident_bytes"] / max(touched, 1),
        "distinct_tokens": mem_meki["distinct_tokens"],
        # RAM: total RSS, the MeKi process's without the table's resident pages (the table is on
        # flash; its page cache is reported on its own above), after malloc_trim.
        "rss_delta_bytes": ram_delta,
        "rss_delta_over_table": ram_delta / table_bytes,
        "rss_total_dense_bytes": mem_dense["rss_total_bytes_trimmed"],
        "rss_total_meki_bytes": mem_meki["rss_total_bytes_trimmed"],
        "rss_anon_delta_bytes": mem_meki["rss_anon_bytes_trimmed"] - mem_dense["rss_anon_bytes_trimmed"],
        "memory_tokens": cfg.memory_tokens,
        "threads": torch.get_num_threads(),
    }


def _ci_cell(ci: dict[str, Any] | None) -> str:
    return "-" if ci is None else f"{ci['ratio']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"


def results_table(results: Sequence[dict[str, Any]], title: str = "batch-1 greedy decode"):
    """A rich Table of bench_decode results, one row per result: speeds (geometric means over
    rounds), the ratios with their confidence intervals, and the memory figures."""
    from rich.table import Table

    conf = results[0]["config"]["confidence"] if results else 0.95
    table = Table(title=title, caption=f"ratios: geometric mean of per-round ratios [{conf:.0%} CI]")
    cols = (
        "d_mem", "rounds (stop)", "dense tok/s", "dense fused tok/s", "MeKi tok/s", "MeKi / dense", "MeKi / dense fused",
        "cold MeKi / dense (rounds)", "cold MeKi / dense fused", "unfolded tok/s", "table MiB", "resident/touched",
        "RSS delta / table",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        ratios = r["ratios"]
        table.add_row(
            str(r["config"]["d_mem"]), f"{r['rounds']} ({r['stop_reason']})", f"{r['dense_tok_s']:.2f}",
            f"{r['dense_fused_tok_s']:.2f}", f"{r['meki_tok_s']:.2f}", _ci_cell(ratios["meki_over_dense"]),
            _ci_cell(ratios["meki_over_dense_fused"]),
            _ci_cell(ratios.get("cold_meki_over_dense")) + (f" ({r['cold_rounds']})" if r["cold_rounds"] else ""),
            _ci_cell(ratios.get("cold_meki_over_dense_fused")),
            "-" if r["unfolded_tok_s"] is None else f"{r['unfolded_tok_s']:.2f}",
            f"{r['table_bytes'] / 2**20:.1f}", f"{r['resident_over_touched']:.2f}", f"{r['rss_delta_over_table']:.3%}",
        )
    return table


if __name__ == "__main__":  # child-process entry for memory_probe
    args = json.loads(sys.argv[1])
    result = memory_probe(DecodeBenchConfig(**args["cfg"]), args["arm"], Path(args["bundle"]))
    print(json.dumps(result))
