"""Logit lens and loss by token frequency on a tiny corpus and tiny random models (HF and MeKi)."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_usage_error, randomize_meki
from romscale.analysis.common import val_blocks
from romscale.analysis.freq import bucket_edges, bucket_of, target_losses, token_counts, token_freq_report
from romscale.analysis.logit_lens import logit_lens, logit_lens_report
from romscale.data.corpus import CorpusConfig, build_corpus, open_corpus

WORDS = ("the of and to in is was that for it as with by on are from at his an be this which or river mountain city "
         "king queen ship sea storm bread garden lamp window winter summer north south zebra quartz").split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("an")
    rng = random.Random(0)
    # Zipf-like word use, so token counts span several decades
    weights = [1 / (k + 1) for k in range(len(WORDS))]
    docs = [" ".join(rng.choices(WORDS, weights, k=120)) + "." for _ in range(40)]
    src = root / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    out = root / "corpus"
    build_corpus(CorpusConfig(inputs=(src,), vocab_size=120, val_fraction=0.25, progress=False), out, log=lambda s: None)
    return out


def _model(vocab, seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _reference_kl(model, blocks):
    """KL(final || lens) per layer from output_hidden_states (hidden_states[l + 1] is block l's
    output for all but the last block; the last entry is already normed)."""
    x = torch.from_numpy(blocks[:, :-1])
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
        logp = torch.log_softmax(o.logits, -1)
        dec, head = model.get_decoder(), model.get_output_embeddings()
        out, rev = [], []
        for h in o.hidden_states[1:-1]:
            lq = torch.log_softmax(head(dec.norm(h)), -1)
            out.append((logp.exp() * (logp - lq)).sum(-1).mean().item())
            rev.append(torch.nn.functional.kl_div(logp, lq, log_target=True, reduction="none").sum(-1).mean().item())
    return out, rev


def test_val_blocks_predict_each_target_once(corpus_dir):
    c = open_corpus(corpus_dir)
    b = val_blocks(c, tokens=50, seq_len=8)
    flat = np.concatenate([np.asarray(s) for s in c.val])
    assert b.shape == (6, 9)
    assert np.array_equal(b[:, 1:].reshape(-1), flat[1:49]) and np.array_equal(b[1:, 0], b[:-1, -1])


def test_logit_lens_matches_hidden_states_and_is_zero_at_the_last_block(corpus_dir):
    c = open_corpus(corpus_dir)
    model = _model(c.vocab_size)
    blocks = val_blocks(c, 64, 16)
    r = logit_lens(model, blocks, batch_size=3)
    assert r["layers"] == 3 and r["positions"] == blocks.shape[0] * 16
    kl, rev = _reference_kl(model, blocks)
    assert r["kl"][:-1] == pytest.approx(kl, rel=1e-4) and r["kl_reverse"][:-1] == pytest.approx(rev, rel=1e-4)
    assert r["kl"] != r["kl_reverse"]
    assert abs(r["kl"][-1]) < 1e-5 and abs(r["kl_reverse"][-1]) < 1e-5 and r["top1_agreement"][-1] == 1.0
    assert all(v > 1e-4 for v in r["kl"][:-1])


def test_logit_lens_sees_a_memory_added_after_the_ffn(corpus_dir):
    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig

    c = open_corpus(corpus_dir)
    model = _model(c.vocab_size)
    attach_meki(model, MekiConfig(d_mem=8, position="after_ffn"))
    randomize_meki(model)
    r = logit_lens(model, val_blocks(c, 32, 16))
    assert abs(r["kl"][-1]) < 1e-5  # the hook saw the layer output with MeKi's contribution in it


def test_token_counts_and_buckets(corpus_dir):
    c = open_corpus(corpus_dir)
    counts = token_counts(c)
    flat = np.concatenate([np.asarray(s) for s in c.train]).astype(np.int64)
    assert np.array_equal(counts, np.bincount(flat, minlength=c.vocab_size))
    assert bucket_edges(250) == [0, 1, 10, 100, 1000]
    assert bucket_edges(250, [50, 5]) == [0, 5, 50, 251]
    assert bucket_of(np.array([0, 1, 9, 10, 999]), [0, 1, 10, 100, 1000]).tolist() == [0, 1, 1, 2, 3]


def test_loss_by_frequency_adds_up_to_the_hf_loss(corpus_dir, tmp_path):
    c = open_corpus(corpus_dir)
    model = _model(c.vocab_size)
    model.save_pretrained(tmp_path / "m")
    blocks = val_blocks(c, 96, 16)
    t, loss = target_losses(model, blocks, batch_size=4)
    x = torch.from_numpy(blocks)
    with torch.no_grad():
        hf = model(x[:, :-1], labels=x[:, :-1]).loss  # HF shifts: the targets of positions 0..14
        ce = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    assert loss.mean() == pytest.approx(ce.item(), rel=1e-5) and np.array_equal(t, blocks[:, 1:].reshape(-1))
    assert hf.item() > 0
    r = token_freq_report([tmp_path / "m"], corpus_dir, tokens=96, seq_len=16)
    m = r["models"][0]
    n = [b["val_targets"] for b in r["buckets"]]
    assert sum(n) == r["tokens"] == 96
    assert sum(k * v for k, v in zip(n, m["loss"]) if v is not None) / sum(n) == pytest.approx(m["loss_all"], rel=1e-9)
    assert sum(b["train_tokens"] for b in r["buckets"]) == r["train_tokens"] == sum(s.shape[0] for s in c.train)
    assert sum(1 for v in m["loss"] if v is not None) >= 2  # the Zipf corpus fills several buckets


def test_cli_both_analyses_write_json_and_png(cli, corpus_dir, tmp_path):
    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.io import save_meki

    v = open_corpus(corpus_dir).vocab_size
    _model(v).save_pretrained(tmp_path / "dense")
    meki = _model(v, seed=1)
    attach_meki(meki, MekiConfig(d_mem=8))
    randomize_meki(meki)
    save_meki(meki, tmp_path / "meki")
    models = ["--model", tmp_path / "dense", "--model", tmp_path / "meki"]
    j, p = tmp_path / "lens.json", tmp_path / "lens.png"
    r = cli("analyze", "logit-lens", *models, "--corpus", corpus_dir, "--json", j, "--png", p, "--tokens", 64, "--seq-len", 16)
    assert r.exit_code == 0, r
    rep = json.loads(j.read_text())
    assert rep["romscale_output"] == "logit-lens" and [m["model_kind"] for m in rep["models"]] == ["hf", "meki-checkpoint"]
    want = logit_lens_report([tmp_path / "dense"], corpus_dir, tokens=64, seq_len=16)["models"][0]["kl"]
    assert rep["models"][0]["kl"] == pytest.approx(want)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j2, p2 = tmp_path / "freq.json", tmp_path / "freq.png"
    r = cli("analyze", "token-freq", *models, "--corpus", corpus_dir, "--json", j2, "--png", p2, "--tokens", 64, "--seq-len", 16,
            "--edges", "10,100")
    assert r.exit_code == 0, r
    rep = json.loads(j2.read_text())
    assert rep["edges"][:3] == [0, 10, 100] and len(rep["models"][1]["delta_vs_first"]) == len(rep["buckets"])
    assert p2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same outputs again: refused without --overwrite, replaced with it
    again = ("analyze", "token-freq", *models, "--corpus", corpus_dir, "--json", j2, "--png", p2, "--tokens", 64, "--seq-len", 16)
    assert_usage_error(cli(*again), "--json", "--overwrite")
    assert cli(*again, "--overwrite").exit_code == 0


def test_cli_usage_errors(cli, corpus_dir, tmp_path):
    _model(open_corpus(corpus_dir).vocab_size).save_pretrained(tmp_path / "m")
    _model(50).save_pretrained(tmp_path / "small")
    j, p = tmp_path / "o.json", tmp_path / "o.png"
    base = ("analyze", "token-freq", "--model", tmp_path / "m", "--corpus", corpus_dir, "--json", j, "--png", p)
    assert_usage_error(cli(*base, "--tokens", 0), "--tokens")
    assert_usage_error(cli(*base, "--edges", "a,b"), "--edges")
    assert_usage_error(cli("analyze", "logit-lens", "--model", tmp_path / "m", "--corpus", tmp_path / "m", "--json", j, "--png", p),
                       "--corpus", "not a complete romscale corpus")
    assert_usage_error(cli("analyze", "logit-lens", "--model", tmp_path / "m", "--corpus", corpus_dir, "--json", j, "--png", j),
                       "same file")
    assert_usage_error(cli("analyze", "logit-lens", "--model", tmp_path / "nope", "--corpus", corpus_dir, "--json", j, "--png", p),
                       "--model")
    assert_usage_error(cli("analyze", "logit-lens", "--model", tmp_path / "small", "--corpus", corpus_dir, "--json", j, "--png", p),
                       "--model", "vocabulary")
    assert not j.exists() and not p.exists()
