"""romscale data corpus: cleaning, de-duplication, splits, shards and the reader, on tiny synthetic
documents (the package sources are replaced; no network)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_usage_error

from romscale.data import sources
from romscale.data.corpus import CorpusConfig, build_corpus, clean, english_ratio, open_corpus
from romscale.errors import RomscaleError

WORDS = ("the of and to in is was that for it as with by on are from at his an be this which or river mountain city "
         "king queen ship sea storm bread garden lamp window winter summer north south").split()


def _doc(seed: int, n: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


BASE = [_doc(i) for i in range(40)]
NEAR = BASE[3].replace("river", "stream", 1)  # one word changed out of 90: a near duplicate
GERMAN = "Die Stadt liegt am Fluss und hat viele alte Häuser, eine Kirche und einen großen Marktplatz. " * 3


def _alpha() -> list[tuple[str, str]]:
    docs = [(f"a/{i}", t) for i, t in enumerate(BASE[:25])]
    docs += [("a/dup", BASE[0]), ("a/dup-ws", "  " + BASE[1].upper().replace(" ", "  \t") + "\n"),
             ("a/near", NEAR), ("a/empty", ""), ("a/short", "tiny")]
    return docs


def _beta() -> list[tuple[str, str]]:
    return [(f"b/{i}", t) for i, t in enumerate(BASE[25:], start=25)] + [("b/de", GERMAN), ("b/dup", BASE[2])]


@pytest.fixture
def fake_sources(monkeypatch):
    reg = {
        "alpha": sources.Source("alpha", "alpha==1", "test", lambda: iter(_alpha())),
        "beta": sources.Source("beta", "beta==1", "test", lambda: iter(_beta()), english_only=True),
    }
    monkeypatch.setattr(sources, "SOURCES", reg)
    return reg


def _cfg(**kw) -> CorpusConfig:
    base = dict(sources=("alpha", "beta"), vocab_size=300, val_fraction=0.1, progress=False)
    base.update(kw)
    return CorpusConfig(**base)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _decode_docs(c, split: str) -> list[str]:
    tok = c.tokenizer()
    ids = np.concatenate([np.asarray(m) for m in c.splits[split]]).astype(np.int64)
    cuts = np.flatnonzero(ids == c.eos_id)
    out, start = [], 0
    for e in cuts:
        out.append(tok.decode(ids[start:e].tolist()))
        start = e + 1
    assert start == ids.size  # every document ends with the end-of-text token
    return out


def test_clean_and_english():
    assert clean("a\r\nb\x00c  \t d \n\n\n\ne ") == "a\nbc d\n\ne"
    assert english_ratio(BASE[0]) > 0.3 and english_ratio(GERMAN) < 0.1


def test_build_dedupes_splits_and_reads_back(fake_sources, tmp_path):
    out = tmp_path / "c"
    info = build_corpus(_cfg(), out, log=lambda s: None)
    a, b = info["sources"]["alpha"], info["sources"]["beta"]
    assert a["docs_read"] == 30 and a["dropped_short"] == 2 and a["exact_duplicates"] == 2 and a["near_duplicates"] == 1
    assert a["docs"] == 25
    assert b["dropped_non_english"] == 1 and b["exact_duplicates"] == 1 and b["docs"] == 15
    assert info["totals"]["docs"] == 40

    c = open_corpus(out)
    assert c.dtype == np.uint16 and c.vocab_size <= 300
    for split in ("train", "val"):
        shards = info["splits"][split]["shards"]
        assert [m.shape[0] for m in c.splits[split]] == [s["tokens"] for s in shards]
        assert all(isinstance(m, np.memmap) and m.mode == "r" for m in c.splits[split])
        assert (out / shards[0]["name"]).stat().st_size == 2 * shards[0]["tokens"]
    train, val = _decode_docs(c, "train"), _decode_docs(c, "val")
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(clean(t) for t in BASE)  # every kept doc, decoded exactly
    assert info["splits"]["train"]["tokens"] + info["splits"]["val"]["tokens"] == a["tokens"] + b["tokens"]
    manifest = json.loads((out / "romscale_manifest.json").read_text())
    assert set(manifest["files"]) == set(_tree(out)) - {"romscale_manifest.json"}
    assert manifest["corpus"]["sources"]["alpha"]["docs"] == 25


def test_same_inputs_same_bytes(fake_sources, tmp_path):
    build_corpus(_cfg(), tmp_path / "one", log=lambda s: None)
    build_corpus(_cfg(), tmp_path / "two", log=lambda s: None)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_small_shards(fake_sources, tmp_path):
    info = build_corpus(_cfg(shard_tokens=500), tmp_path / "c", log=lambda s: None)
    shards = info["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] == 500 for s in shards[:-1])
    c = open_corpus(tmp_path / "c")
    assert len(c.train) == len(shards)


def test_open_corpus_refuses_a_tampered_shard(fake_sources, tmp_path):
    build_corpus(_cfg(), tmp_path / "c", log=lambda s: None)
    shard = tmp_path / "c" / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(RomscaleError, match="sha256"):
        open_corpus(tmp_path / "c")


def test_cli_with_user_inputs(cli, fake_sources, tmp_path):
    txt = tmp_path / "story.txt"
    txt.write_text(_doc(100, 200))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": _doc(200 + i)}) + "\n" for i in range(12)) + "\n")
    out, report = tmp_path / "c", tmp_path / "r.json"
    r = cli("data", "corpus", "--sources", "none", "--input", txt, "--input", jsonl, "--out", out,
            "--vocab-size", 300, "--val-fraction", 0.2, "--no-progress", "--json", report)
    assert r.exit_code == 0, r
    assert "input:story.txt" in r.stdout and "input:docs.jsonl" in r.stdout
    rep = json.loads(report.read_text())
    assert rep["sources"]["input:story.txt"]["docs"] == 1 and rep["sources"]["input:docs.jsonl"]["docs"] == 12
    c = open_corpus(out)
    assert sorted(_decode_docs(c, "train") + _decode_docs(c, "val")) == sorted(
        [_doc(100, 200)] + [_doc(200 + i) for i in range(12)])


def test_cli_saved_dataset(cli, fake_sources, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [_doc(300 + i) for i in range(6)], "label": list(range(6))}).save_to_disk(str(folder))
    r = cli("data", "corpus", "--sources", "none", "--input", folder, "--out", tmp_path / "c", "--vocab-size", 300,
            "--val-fraction", 0.3, "--no-progress")
    assert r.exit_code == 0, r
    assert open_corpus(tmp_path / "c").info["sources"]["input:ds"]["docs"] == 6


@pytest.mark.parametrize("args,needle", [
    (["--vocab-size", "100"], "--vocab-size"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--val-fraction", "0.7"], "--val-fraction"),
    (["--sources", "alpha,nope"], "--sources"),
    (["--sources", "none"], "nothing to build"),
    (["--tokenizer", "wordpiece"], "--tokenizer"),
    (["--input", "/nonexistent/x.txt"], "--input"),
])
def test_cli_bad_options(cli, fake_sources, tmp_path, args, needle):
    r = cli("data", "corpus", "--out", tmp_path / "c", "--no-progress", *args)
    assert_usage_error(r, needle)
    assert not (tmp_path / "c").exists()


def test_cli_refuses_a_foreign_out(cli, fake_sources, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = cli("data", "corpus", "--out", out, "--vocab-size", 300, "--no-progress")
    assert_usage_error(r, "--out", "not a romscale output")
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_bad_jsonl_line(cli, fake_sources, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    r = cli("data", "corpus", "--sources", "none", "--input", bad, "--out", tmp_path / "c", "--no-progress")
    assert_usage_error(r, "bad.jsonl", "line 2")


def test_smollm2_tokenizer_path(monkeypatch, fake_sources, tmp_path):
    """--tokenizer smollm2 plumbing, with a stand-in for the packaged tokenizer (no download)."""
    from romscale.data import tokenizers
    from romscale.train.data import train_tokenizer

    stand_in = train_tokenizer(BASE, 280)
    monkeypatch.setattr(tokenizers, "smollm2_tokenizer", lambda: stand_in)
    info = build_corpus(_cfg(tokenizer="smollm2"), tmp_path / "c", log=lambda s: None)
    assert info["tokenizer"]["kind"] == "smollm2" and "requested_vocab_size" not in info["tokenizer"]
    c = open_corpus(tmp_path / "c")
    assert sorted(_decode_docs(c, "train") + _decode_docs(c, "val")) == sorted(clean(t) for t in BASE)
