"""Documents -> a cleaned, de-duplicated, split, tokenised corpus in memory-mapped token shards.

The steps, in order (all deterministic: sources in name order, then user inputs in the order given,
documents in each source's order; first occurrence wins; no set or hash-seed order anywhere):
1. clean: Unicode NFC, newlines normalised, control characters dropped, runs of spaces/tabs made one
   space, trailing spaces cut, 3+ newlines made 2; documents under `min_chars` characters dropped.
2. English filter (sources marked english_only only): at least `english_min_ratio` of the words are
   among 24 common English function words (the, of, and, to, ...), words counted in any script;
   (threshold chosen by looking at a sample of the bigbench pages; not a committed measurement).
3. exact de-duplication: sha256 of the lower-cased, whitespace-collapsed text.
4. near de-duplication: MinHash (datasketch, `num_perm` permutations, seed 1, crc32 shingle hash) of
   word 5-gram shingles, LSH at Jaccard `near_threshold`; a document whose LSH candidates include an
   earlier kept one with estimated Jaccard >= the threshold is dropped.
5. split by document: sha256(doc id) mapped to [0, 1) picks validation when below `val_fraction`.
6. tokenise: a byte-level BPE (HF tokenizers) trained on the training split only, or the SmolLM2
   tokenizer (romscale.data.tokenizers); every document is
   followed by the end-of-text token; shards are flat little-endian uint16 arrays (uint32 when the
   vocabulary does not fit), described by corpus.json.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from romscale.errors import RomscaleError

CORPUS_KIND = "corpus"
CORPUS_FILE = "corpus.json"
CORPUS_FORMAT = "romscale-corpus"
CORPUS_VERSION = 1
TOKENIZER_DIR = "tokenizer"
EOS = "<|endoftext|>"
ENGLISH_WORDS = ("the of and to in is was that for it as with by on are from at his an be this which or "
                 "not have").split()
_ENGLISH = frozenset(ENGLISH_WORDS)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # words in any script, so Cyrillic etc. count against
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_TRAILING = re.compile(r" +\n")
_NEWLINES = re.compile(r"\n{3,}")


@dataclass
class CorpusConfig:
    sources: tuple[str, ...] = ()  # registry names (romscale.data.sources.SOURCES)
    inputs: tuple[Path, ...] = ()  # user .txt / .jsonl files, or datasets.save_to_disk folders
    tokenizer: str = "bpe"  # romscale.data.tokenizers.TOKENIZERS
    vocab_size: int = 16384  # bpe only
    val_fraction: float = 0.01
    min_chars: int = 32
    english_min_ratio: float = 0.2
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5
    shard_tokens: int = 1 << 27  # 128 Mi tokens per shard (256 MiB as uint16)
    progress: bool = True


@dataclass
class SourceStats:
    docs_read: int = 0
    chars_read: int = 0
    dropped_short: int = 0
    dropped_non_english: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    docs: int = 0
    chars: int = 0
    train_docs: int = 0
    val_docs: int = 0
    tokens: int = 0


@dataclass
class _Doc:
    source: str
    doc_id: str
    text: str


# -- cleaning and filtering -------------------------------------------------------------------------
def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _NEWLINES.sub("\n\n", text).strip()


def english_ratio(text: str) -> float:
    words = _WORD.findall(text.lower())
    return sum(w in _ENGLISH for w in words) / len(words) if words else 0.0


def _exact_key(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).digest()


def _shingles(text: str, n: int) -> list[bytes]:
    words = text.lower().split()
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def _crc32(b: bytes) -> int:
    return zlib.crc32(b)


def val_score(key: str) -> float:
    """A document's deterministic position in [0, 1): below val_fraction means validation."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


# -- reading ----------------------------------------------------------------------------------------
def read_inputs(paths: Iterable[Path]) -> Iterator[tuple[str, str, str]]:
    """(source label, doc id, text) from user inputs: a .jsonl file (one {"text": ...} object per
    line), a folder saved with datasets.save_to_disk (its "text" column), or any other file as one
    plain-text document (UTF-8)."""
    for k, path in enumerate(paths):
        label = f"input:{path.name}"
        if path.is_dir():
            yield from ((label, i, t) for i, t in _read_saved_dataset(path))
        elif path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise RomscaleError(f"--input {path}: line {n} is not valid JSON ({exc.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise RomscaleError(f"--input {path}: line {n} has no string \"text\" field")
                    yield label, f"input{k}/{path.name}/{n}", obj["text"]
        else:
            yield label, f"input{k}/{path.name}", path.read_text(encoding="utf-8", errors="replace")


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise RomscaleError(f"--input {path}: reading a saved dataset folder needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a folder it cannot read
        raise RomscaleError(f"--input {path}: not a dataset saved with datasets.save_to_disk ({exc})") from None
    parts = [(name, ds[name]) for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, d in parts:
        if "text" not in d.column_names:
            raise RomscaleError(f"--input {path}: the dataset{' split ' + split if split else ''} has no \"text\" column "
                                f"(columns: {', '.join(d.column_names)})")
        for i, t in enumerate(d["text"]):
            if isinstance(t, str):
                yield f"{path.name}/{split}/{i}", t


def _all_docs(cfg: CorpusConfig) -> Iterator[tuple[str, str, str, bool]]:
    from romscale.data.sources import SOURCES

    for name in sorted(cfg.sources):
        src = SOURCES[name]
        for doc_id, text in src.read():
            yield name, doc_id, text, src.english_only
    for label, doc_id, text in read_inputs(cfg.inputs):
        yield label, doc_id, text, False


def _bar(it: Iterable, cfg: CorpusConfig, desc: str, total: int | None = None, unit: str = "doc") -> Iterable:
    if not cfg.progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)


def collect(cfg: CorpusConfig) -> tuple[list[_Doc], dict[str, SourceStats]]:
    """Read, clean, filter and de-duplicate every document (steps 1-4)."""
    from datasketch import MinHash, MinHashLSH

    stats: dict[str, SourceStats] = {}
    seen: set[bytes] = set()
    kept: list[_Doc] = []
    for source, doc_id, raw, english_only in _bar(_all_docs(cfg), cfg, "reading"):
        st = stats.setdefault(source, SourceStats())
        st.docs_read += 1
        st.chars_read += len(raw)
        text = clean(raw)
        if len(text) < cfg.min_chars:
            st.dropped_short += 1
            continue
        if english_only and english_ratio(text) < cfg.english_min_ratio:
            st.dropped_non_english += 1
            continue
        key = _exact_key(text)
        if key in seen:  # membership only: no order comes from the set
            st.exact_duplicates += 1
            continue
        seen.add(key)
        kept.append(_Doc(source, doc_id, text))

    lsh = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm)
    hashes: dict[int, Any] = {}
    out: list[_Doc] = []
    for i, d in enumerate(_bar(kept, cfg, "near-dedupe")):
        m = MinHash(num_perm=cfg.num_perm, seed=1, hashfunc=_crc32)
        m.update_batch(_shingles(d.text, cfg.shingle_words))
        if any(m.jaccard(hashes[c]) >= cfg.near_threshold for c in sorted(lsh.query(m))):
            stats[d.source].near_duplicates += 1
            continue
        lsh.insert(i, m)
        hashes[i] = m
        out.append(d)
    for d in out:
        st = stats[d.source]
        st.docs += 1
        st.chars += len(d.text)
    return out, stats


def split_docs(docs: list[_Doc], val_fraction: float) -> tuple[list[_Doc], list[_Doc]]:
    """Step 5; at least one document in each split when there are two or more."""
    scores = [val_score(f"{d.source}\x00{d.doc_id}") for d in docs]
    val_idx = [i for i, s in enumerate(scores) if s < val_fraction]
    if not val_idx and len(docs) >= 2:
        val_idx = [min(range(len(docs)), key=lambda i: (scores[i], i))]
    if len(val_idx) == len(docs):
        raise RomscaleError(f"only {len(docs)} document(s) left after cleaning and de-duplication; a corpus needs "
                            "documents for both training and validation")
    chosen = frozenset(val_idx)
    return [d for i, d in enumerate(docs) if i not in chosen], [docs[i] for i in sorted(chosen)]


# -- tokenising and writing -------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.cap = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")
        self.shards.append({"name": name, "tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self.shards[-1]["tokens"] >= self.cap:
                self.close()
                self._open()
            room = self.cap - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            self._f.close()
            self._f = None


def _tokenise(docs: list[_Doc], tok, eos_id: int, writer: _ShardWriter, stats: dict[str, SourceStats],
              cfg: CorpusConfig, desc: str) -> int:
    total = 0
    batch = 256
    for start in _bar(range(0, len(docs), batch), cfg, desc, unit="batch"):
        chunk = docs[start:start + batch]
        for d, enc in zip(chunk, tok.encode_batch([d.text for d in chunk], add_special_tokens=False)):
            ids = np.fromiter(enc.ids, dtype=np.int64, count=len(enc.ids))
            ids = np.append(ids, eos_id)
            writer.write(ids)
            stats[d.source].tokens += int(ids.size)
            total += int(ids.size)
    writer.close()
    return total


def build_corpus(cfg: CorpusConfig, out: Path, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the corpus folder `out` (kind "corpus"); returns the description written to corpus.json."""
    from romscale.data.tokenizers import make_tokenizer
    from romscale.utils.outputs import output_dir

    docs, stats = collect(cfg)
    train, val = split_docs(docs, cfg.val_fraction)
    for name, part in (("train", train), ("val", val)):
        for d in part:
            setattr(stats[d.source], f"{name}_docs", getattr(stats[d.source], f"{name}_docs") + 1)
    log(f"{len(docs):,} documents after cleaning and de-duplication ({len(train):,} train, {len(val):,} val); training/loading the {cfg.tokenizer} tokenizer")
    with output_dir(out, kind=CORPUS_KIND, inputs=list(cfg.inputs), overwrite=overwrite, what="--out") as o:
        fast, eos_id = make_tokenizer(cfg.tokenizer, (d.text for d in train), cfg.vocab_size, o.path / TOKENIZER_DIR)
        tok = fast.backend_tokenizer
        vocab = tok.get_vocab_size()
        dtype = token_dtype(vocab)
        splits: dict[str, Any] = {}
        for name, part in (("train", train), ("val", val)):
            w = _ShardWriter(o.path, name, dtype, cfg.shard_tokens)
            n = _tokenise(part, tok, eos_id, w, stats, cfg, f"tokenising {name}")
            splits[name] = {"docs": len(part), "tokens": n, "shards": w.shards}
        info = {
            "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "dtype": dtype.str, "vocab_size": vocab,
            "eos_id": eos_id, "eos_token": tok.id_to_token(eos_id),
            "tokenizer": {"kind": cfg.tokenizer, "folder": TOKENIZER_DIR,
                          **({"requested_vocab_size": cfg.vocab_size} if cfg.tokenizer == "bpe" else {})},
            "splits": splits,
            "sources": {k: vars(v) for k, v in sorted(stats.items())},
            "totals": {"docs": len(docs), "chars": sum(len(d.text) for d in docs),
                       "tokens": sum(s["tokens"] for s in splits.values())},
            "rules": {
                "min_chars": cfg.min_chars, "english_min_ratio": cfg.english_min_ratio, "english_words": ENGLISH_WORDS,
                "exact_dedupe": "sha256 of lower-cased, whitespace-collapsed text",
                "near_dedupe": {"method": "MinHash LSH (datasketch)", "threshold": cfg.near_threshold,
                                "num_perm": cfg.num_perm, "shingle": f"word {cfg.shingle_words}-grams", "seed": 1,
                                "hash": "crc32"},
                "val_fraction": cfg.val_fraction, "split": "sha256(source NUL doc id) / 2**64 < val_fraction",
            },
        }
        (o.path / CORPUS_FILE).write_text(json.dumps(info, indent=2) + "\n")
        o.meta["corpus"] = {k: info[k] for k in ("dtype", "vocab_size", "totals", "sources")}
    return info


# -- reading a corpus -------------------------------------------------------------------------------
@dataclass
class Corpus:
    folder: Path
    info: dict[str, Any]
    dtype: np.dtype
    vocab_size: int
    eos_id: int
    splits: dict[str, list[np.memmap]] = field(default_factory=dict)

    @property
    def train(self) -> list[np.memmap]:
        return self.splits["train"]

    @property
    def val(self) -> list[np.memmap]:
        return self.splits["val"]

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(self.folder / self.info["tokenizer"]["folder"])


def open_corpus(folder: str | Path, *, verify: bool = True) -> Corpus:
    """Check a corpus folder (manifest, and sha256 of every file unless verify=False; corpus.json
    against the shard sizes) and return read-only memory maps of its shards, one list per split."""
    from romscale.utils.outputs import member, read_json, read_manifest

    folder = Path(folder)
    read_manifest(folder, CORPUS_KIND, RomscaleError, hash_files=verify)
    where = str(folder / CORPUS_FILE)
    info = read_json(member(folder, CORPUS_FILE, RomscaleError, where), RomscaleError)
    if not isinstance(info, dict) or info.get("format") != CORPUS_FORMAT or info.get("version") != CORPUS_VERSION:
        raise RomscaleError(f"{where}: not a {CORPUS_FORMAT} version {CORPUS_VERSION} description")
    if info.get("dtype") not in ("<u2", "<u4"):
        raise RomscaleError(f"{where}: dtype {info.get('dtype')!r}; expected '<u2' or '<u4'")
    dtype = np.dtype(info["dtype"])
    vocab, eos = info.get("vocab_size"), info.get("eos_id")
    if not isinstance(vocab, int) or not isinstance(eos, int) or not 0 <= eos < vocab or vocab > np.iinfo(dtype).max + 1:
        raise RomscaleError(f"{where}: vocab_size {vocab!r} / eos_id {eos!r} do not fit dtype {dtype.str}")
    c = Corpus(folder=folder, info=info, dtype=dtype, vocab_size=vocab, eos_id=eos)
    splits = info.get("splits")
    if not isinstance(splits, dict) or not {"train", "val"} <= set(splits):
        raise RomscaleError(f"{where}: 'splits' must hold 'train' and 'val'")
    for name in ("train", "val"):
        maps = []
        for s in splits[name].get("shards", []):
            p = member(folder, s.get("name"), RomscaleError, where)
            n = s.get("tokens")
            if not isinstance(n, int) or n <= 0 or p.stat().st_size != n * dtype.itemsize:
                raise RomscaleError(f"{p}: {p.stat().st_size:,} bytes, but {where} says {n!r} tokens of {dtype.itemsize} bytes")
            maps.append(np.memmap(p, dtype=dtype, mode="r", shape=(n,)))
        if sum(m.shape[0] for m in maps) != splits[name].get("tokens"):
            raise RomscaleError(f"{where}: the {name} shards' token counts do not add up to its 'tokens'")
        c.splits[name] = maps
    return c
