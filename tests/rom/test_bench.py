"""The decode benchmark: its paired-ratio confidence intervals, its round order and stop rule, and an
end-to-end run on the tiny preset that reports every key the results table needs. No timed asserts."""

import json
import math

import pytest
from rich.console import Console

from romscale.bench.decode import (
    STOP_REASONS,
    DecodeBenchConfig,
    bench_decode,
    paired_ratio_ci,
    results_table,
    round_order,
    stop_reason,
)
from romscale.meki.presets import get_preset

CI_KEYS = {"ratio", "ci_low", "ci_high", "halfwidth", "n", "confidence", "log_sd", "per_round"}
TABLE_KEYS = {
    "dense_tok_s", "meki_tok_s", "unfolded_tok_s", "meki_cold_tok_s", "dense_fused_tok_s", "ratio",
    "ratio_vs_dense_fused", "ratio_cold", "ratio_cold_vs_dense_fused", "unfolded_ratio", "table_bytes",
    "touched_rows_bytes", "table_resident_bytes", "resident_over_touched", "rss_delta_bytes",
    "rss_delta_over_table", "rss_anon_delta_bytes", "rss_total_dense_bytes", "rss_total_meki_bytes", "read_bytes_per_token", "rounds", "stop_reason",
    "cold_rounds", "ratios", "speeds_tok_s", "cold_speeds_tok_s", "orders", "cold_orders", "verify_rows",
}


def test_paired_ratio_ci_matches_a_hand_computed_t_interval():
    num, den = [10.0, 11.0, 12.0, 9.0], [10.0, 10.0, 10.0, 10.0]
    logs = [math.log(1.0), math.log(1.1), math.log(1.2), math.log(0.9)]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 3)
    half = 3.182446305 * sd / 2  # t_{0.975, df=3} from a t table; se = sd / sqrt(4)
    ci = paired_ratio_ci(num, den)
    assert set(ci) == CI_KEYS
    assert ci["n"] == 4 and ci["confidence"] == 0.95
    assert ci["ratio"] == pytest.approx((1.0 * 1.1 * 1.2 * 0.9) ** 0.25, rel=1e-12)  # the geometric mean
    assert ci["ci_low"] == pytest.approx(math.exp(mean - half), rel=1e-8)
    assert ci["ci_high"] == pytest.approx(math.exp(mean + half), rel=1e-8)
    assert ci["halfwidth"] == pytest.approx(math.exp(half) - 1, rel=1e-8)
    assert ci["per_round"] == pytest.approx([1.0, 1.1, 1.2, 0.9])
    # Only the ratios matter: scaling both speeds of a pair leaves the interval as it is.
    assert paired_ratio_ci([a * 3 for a in num], [b * 3 for b in den])["ci_high"] == pytest.approx(ci["ci_high"])
    # A 99% interval is wider than the 95% one.
    assert paired_ratio_ci(num, den, confidence=0.99)["halfwidth"] > ci["halfwidth"]


def test_paired_ratio_ci_narrows_with_more_rounds():
    num, den = [10.0, 10.4, 9.7, 10.1, 9.9], [10.0, 10.0, 10.1, 9.8, 10.0]
    widths = []
    for repeat in (1, 3, 9):  # the same spread of ratios, three and nine times as many rounds
        ci = paired_ratio_ci(num * repeat, den * repeat)
        assert ci["ci_low"] < ci["ratio"] < ci["ci_high"]
        assert ci["ratio"] * (1 - ci["halfwidth"]) <= ci["ci_low"] and ci["ci_high"] == pytest.approx(ci["ratio"] * (1 + ci["halfwidth"]))
        widths.append(ci["halfwidth"])
    assert widths[0] > widths[1] > widths[2] > 0
    assert paired_ratio_ci([2.0, 2.0], [1.0, 1.0])["halfwidth"] == 0.0  # no spread, no width


@pytest.mark.parametrize(
    "num, den, match",
    [([1.0], [1.0], "two"), ([1.0, 2.0], [1.0], "lengths"), ([1.0, 0.0], [1.0, 1.0], "positive"), ([1.0, math.inf], [1.0, 1.0], "positive")],
)
def test_paired_ratio_ci_refuses_bad_input(num, den, match):
    with pytest.raises(ValueError, match=match):
        paired_ratio_ci(num, den)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_round_order_balances_positions_and_pair_orders(k):
    names = "ABCDE"[:k]
    orders = [round_order(names, r) for r in range(2 * k)]
    assert all(sorted(o) == list(names) for o in orders)
    for pos in range(k):  # every arm in every position equally often
        assert sorted(o[pos] for o in orders) == sorted(names * 2)
    before = {(a, b): sum(o.index(a) < o.index(b) for o in orders) for a in names for b in names if a != b}
    assert set(before.values()) == {k}  # each pair of arms in both orders equally often
    if k == 3:
        assert ["".join(o) for o in orders] == ["ABC", "CBA", "BCA", "ACB", "CAB", "BAC"]


def test_stop_rule():
    cfg = DecodeBenchConfig(min_pairs=10, max_pairs=60, target_halfwidth=0.015, max_seconds=100.0)
    narrow, wide = {"halfwidth": 0.01}, {"halfwidth": 0.02}
    assert stop_reason([narrow, narrow], 9, 1e6, cfg) is None  # min_pairs first, whatever else holds
    assert stop_reason([narrow, narrow], 10, 0.0, cfg) == "target_halfwidth"
    assert stop_reason([narrow, wide], 10, 0.0, cfg) is None  # both ratios must be narrow enough
    assert stop_reason([narrow, wide], 60, 0.0, cfg) == "max_pairs"
    assert stop_reason([wide, narrow], 30, 100.0, cfg) == "max_seconds"
    assert stop_reason([wide, wide], 30, 1e9, DecodeBenchConfig(max_seconds=None)) is None


@pytest.mark.parametrize(
    "kw", [{"min_pairs": 1}, {"min_pairs": 10, "max_pairs": 9}, {"target_halfwidth": 0.0}, {"cold_rounds": 1}, {"max_seconds": 0}]
)
def test_config_is_checked(kw, tmp_path):
    with pytest.raises(ValueError):
        bench_decode(DecodeBenchConfig(preset="tiny", **kw), workdir=tmp_path, log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_bench_decode_on_tiny_preset(tmp_path):
    # An unreachable target and a spent time budget: the series stops at min_pairs on max_seconds.
    cfg = DecodeBenchConfig(
        preset="tiny", d_mem=8, new_tokens=3, memory_tokens=6, prompt_len=4, min_pairs=2, max_pairs=4,
        target_halfwidth=1e-12, max_seconds=1e-9, cold_rounds=2,
    )
    lines = []
    r = bench_decode(cfg, workdir=tmp_path, log=lines.append)
    json.dumps(r, allow_nan=False)  # plain JSON, no NaN or infinity
    assert TABLE_KEYS <= set(r)
    assert r["stop_reason"] == "max_seconds" and r["stop_reason"] in STOP_REASONS
    assert r["rounds"] == 2 and r["cold_rounds"] == 2 and r["verify_rows"] is True
    assert set(r["ratios"]) == {
        "meki_over_dense", "meki_over_dense_fused", "unfolded_over_dense", "cold_meki_over_dense", "cold_meki_over_dense_fused",
    }
    assert set(r["speeds_tok_s"]) == {"dense", "dense_fused", "meki", "unfolded"}
    assert set(r["cold_speeds_tok_s"]) == {"dense", "dense_fused", "meki_cold"}
    assert all(len(v) == 2 for v in [*r["speeds_tok_s"].values(), *r["cold_speeds_tok_s"].values()])
    assert all(sorted(o) == sorted(r["speeds_tok_s"]) for o in r["orders"]) and r["orders"][0] != r["orders"][1]
    for name, ci in r["ratios"].items():
        assert set(ci) == CI_KEYS and ci["n"] == 2
        assert ci["ci_low"] <= ci["ratio"] <= ci["ci_high"], name
    # The headline figures are the intervals' ratios, computed from the recorded per-round speeds.
    s, c = r["speeds_tok_s"], r["cold_speeds_tok_s"]
    assert r["ratios"]["meki_over_dense"] == paired_ratio_ci(s["meki"], s["dense"])
    assert r["ratios"]["cold_meki_over_dense_fused"] == paired_ratio_ci(c["meki_cold"], c["dense_fused"])
    assert r["ratio"] == r["ratios"]["meki_over_dense"]["ratio"]
    assert r["ratio_vs_dense_fused"] == r["ratios"]["meki_over_dense_fused"]["ratio"]
    assert r["ratio_cold"] == r["ratios"]["cold_meki_over_dense"]["ratio"]
    # Per-arm speeds are geometric means over the same rounds, so their quotient is the ratio.
    assert r["meki_tok_s"] / r["dense_tok_s"] == pytest.approx(r["ratio"], rel=1e-9)
    assert sum(line.startswith("warm round") for line in lines) == 2 and sum(line.startswith("cold round") for line in lines) == 2
    # Only the rows of tokens actually generated are resident (pages, so at least the touched ones).
    assert 0 < r["touched_rows_bytes"] <= r["table_resident_bytes"] <= 2 * r["touched_rows_bytes"]
    tiny = get_preset("tiny")
    assert r["table_bytes"] == tiny.vocab * tiny.layers * 8 * 2  # fp16 rows of d_mem 8 for every layer
    assert r["read_bytes_per_token"] >= r["table_bytes"] // tiny.vocab  # a row (+ its checksum)
    assert not list(tmp_path.iterdir())  # the temporary bundle is cleaned up
    console = Console(record=True, width=400)
    console.print(results_table([r]))
    text = console.export_text()
    ci = r["ratios"]["meki_over_dense"]
    assert f"{ci['ratio']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" in text and "2 (max_seconds)" in text


def test_bench_decode_without_optional_arms(tmp_path):
    cfg = DecodeBenchConfig(
        preset="tiny", d_mem=8, new_tokens=2, memory_tokens=4, prompt_len=3, min_pairs=2, max_pairs=2, cold_rounds=0, unfolded=False,
    )
    r = bench_decode(cfg, workdir=tmp_path, log=lambda *_: None)
    assert r["stop_reason"] in ("target_halfwidth", "max_pairs") and r["rounds"] == 2
    assert set(r["ratios"]) == {"meki_over_dense", "meki_over_dense_fused"}
    assert set(r["speeds_tok_s"]) == {"dense", "dense_fused", "meki"}
    assert r["unfolded_tok_s"] is r["unfolded_ratio"] is r["ratio_cold"] is r["meki_cold_tok_s"] is None
    assert r["cold_rounds"] == 0 and r["cold_speeds_tok_s"] == {}
    Console(record=True, width=400).print(results_table([r]))  # the table copes with the absent arms
