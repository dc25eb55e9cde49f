"""The decode benchmark runs end to end on a tiny preset and reports every key the issue asks for."""

from romscale.bench.decode import DecodeBenchConfig, bench_decode
from romscale.meki.presets import get_preset

KEYS = {
    "dense_tok_s", "meki_tok_s", "unfolded_tok_s", "ratio", "table_bytes", "touched_rows_bytes",
    "table_resident_bytes", "rss_delta_bytes", "read_bytes_per_token", "dense_fused_tok_s",
    "ratio_vs_dense_fused", "ratio_cold", "rss_delta_trimmed_bytes",
}


def test_bench_decode_on_tiny_preset(tmp_path):
    cfg = DecodeBenchConfig(preset="tiny", d_mem=8, new_tokens=3, memory_tokens=6, runs=5, prompt_len=4)
    r = bench_decode(cfg, workdir=tmp_path, log=lambda *_: None)
    assert KEYS <= set(r)
    assert all(len(v) == 5 for v in r["speeds_tok_s"].values())
    assert r["ratio"] == r["meki_tok_s"] / r["dense_tok_s"]
    # Only the rows of tokens actually generated are resident (pages, so at least the touched ones).
    assert 0 < r["touched_rows_bytes"] <= r["table_resident_bytes"] <= 2 * r["touched_rows_bytes"]
    assert r["read_bytes_per_token"] * get_preset("tiny").vocab == r["table_bytes"]
    assert not list(tmp_path.iterdir())  # the temporary bundle is cleaned up

