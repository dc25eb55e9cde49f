"""What the analyses share: validation blocks from a corpus, models checked against it, plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from romscale.errors import ModelInputError, RomscaleError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from romscale.data.corpus import Corpus


def val_blocks(corpus: Corpus, tokens: int, seq_len: int) -> np.ndarray:
    """The first `tokens` targets of the validation split as blocks of seq_len + 1 ids (inputs are
    block[:-1], targets block[1:]); consecutive blocks overlap by one id, so every target after the
    first id is predicted exactly once, with at most seq_len tokens of context."""
    if seq_len < 1 or tokens < 1:
        raise ValueError("tokens and seq_len must be >= 1")
    need = tokens + 1
    parts, have = [], 0
    for shard in corpus.val:
        take = min(need - have, shard.shape[0])
        parts.append(np.asarray(shard[:take], dtype=np.int64))
        have += take
        if have >= need:
            break
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = (len(flat) - 1) // seq_len
    if n < 1:
        raise RomscaleError(f"{corpus.folder}: the validation split has {len(flat)} tokens; at least {seq_len + 1} are needed "
                            "(lower --seq-len)")
    return np.stack([flat[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


def check_model(model: nn.Module, corpus: Corpus, seq_len: int, where: str) -> None:
    """The model must read the corpus's token ids and fit seq_len positions."""
    emb = model.get_input_embeddings().num_embeddings
    if emb < corpus.vocab_size:
        raise ModelInputError(f"--model {where}: its vocabulary has {emb:,} ids but the corpus {corpus.folder} uses {corpus.vocab_size:,}; "
                              "was it trained on this corpus's tokenizer?")
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ModelInputError(f"--model {where}: has {limit} positions; --seq-len {seq_len} is longer")


def batches(blocks: np.ndarray, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    import sys

    import torch
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not (progress and sys.stderr.isatty())):
        yield torch.from_numpy(blocks[start:start + batch_size])


def model_label(path: Path, paths: Sequence[Path]) -> str:
    """A short name for a plot legend: the folder name, with the parent when names repeat."""
    names = [p.name for p in paths]
    return f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name


def figure(width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib Figure and its axes, without pyplot (no global backend, no window)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()
