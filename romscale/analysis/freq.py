"""Validation loss split by how often the target token occurs in the training shards: where does a
memory help, rare tokens or common ones?

Each validation position's next-token cross-entropy (nats) goes to the bucket of its target id's
count in the corpus's training split. Buckets are half-open count ranges [lo, hi) from `edges`
(default decades: 0 = never seen in training, [1, 10), [10, 100), ... up to the largest count);
per bucket the report gives the vocabulary types and training tokens it holds, the validation
targets that fall in it, and each model's mean loss there. Counts are streamed over the memory-mapped
shards (np.bincount per chunk), never loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from romscale.analysis.common import batches, check_model, model_label, val_blocks

if TYPE_CHECKING:
    from torch import nn

    from romscale.data.corpus import Corpus

__all__ = ["bucket_edges", "bucket_of", "target_losses", "token_counts", "token_freq_report", "plot_token_freq"]

CHUNK = 1 << 24  # tokens per bincount call: 128 MiB of int64 scratch at most


def token_counts(corpus: Corpus, split: str = "train") -> np.ndarray:
    """Occurrences of every token id in `split` (int64, length vocab_size)."""
    counts = np.zeros(corpus.vocab_size, dtype=np.int64)
    for shard in corpus.splits[split]:
        for start in range(0, shard.shape[0], CHUNK):
            counts += np.bincount(np.asarray(shard[start:start + CHUNK]), minlength=corpus.vocab_size)[:corpus.vocab_size]
    return counts


def bucket_edges(max_count: int, edges: Sequence[int] | None = None) -> list[int]:
    """Sorted bucket boundaries starting at 0 and ending past `max_count`: decades by default."""
    if edges is None:
        edges = [0, 1]
        while edges[-1] <= max_count:
            edges.append(edges[-1] * 10)
        return edges
    e = sorted({0, *(int(x) for x in edges)})
    if e[-1] <= max_count:
        e.append(max_count + 1)
    return e


def bucket_of(counts: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """The bucket index of each count: i such that edges[i] <= count < edges[i + 1]."""
    return np.searchsorted(np.asarray(edges), counts, side="right") - 1


def _label(lo: int, hi: int) -> str:
    if hi == lo + 1:
        return str(lo)
    return f"[{lo:,}, {hi:,})"


def target_losses(model: nn.Module, blocks: np.ndarray, *, batch_size: int = 8, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(targets, next-token cross-entropy in nats) for every position of `blocks`, flattened."""
    import torch

    device = next(model.parameters()).device
    losses, targets = [], []
    with torch.inference_mode():
        for x in batches(blocks, batch_size, progress, "validation loss"):
            x = x.to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            losses.append(ce.cpu().numpy())
            targets.append(x[:, 1:].flatten().cpu().numpy())
    return np.concatenate(targets), np.concatenate(losses).astype(np.float64)


def token_freq_report(models: Sequence[Path], corpus_dir: Path, *, tokens: int = 32768, seq_len: int = 256,
                      batch_size: int = 8, edges: Sequence[int] | None = None, progress: bool = False) -> dict[str, Any]:
    """Each model's validation loss per training-frequency bucket of the target token."""
    from romscale.data.corpus import open_corpus
    from romscale.eval.mc import load_scoring_model

    corpus = open_corpus(corpus_dir)
    counts = token_counts(corpus)
    e = bucket_edges(int(counts.max()), edges)
    type_bucket = bucket_of(counts, e)
    nb = len(e) - 1
    blocks = val_blocks(corpus, tokens, seq_len)
    targets = blocks[:, 1:].reshape(-1)
    tb = type_bucket[targets]
    val_n = np.bincount(tb, minlength=nb)
    buckets = [{"label": _label(e[i], e[i + 1]), "lo": e[i], "hi": e[i + 1],
                "types": int((type_bucket == i).sum()), "train_tokens": int(counts[type_bucket == i].sum()),
                "val_targets": int(val_n[i])} for i in range(nb)]
    out = []
    for path in models:
        sm = load_scoring_model(path)
        try:
            check_model(sm.model, corpus, seq_len, str(path))
            t, loss = target_losses(sm.model, blocks, batch_size=batch_size, progress=progress)
        finally:
            sm.close()
        sums = np.bincount(type_bucket[t], weights=loss, minlength=nb)
        out.append({"model": str(path), "label": model_label(Path(path), list(models)), "model_kind": sm.kind,
                    "loss_all": float(loss.mean()),
                    "loss": [float(sums[i] / val_n[i]) if val_n[i] else None for i in range(nb)]})
    first = out[0]["loss"]
    for m in out[1:]:  # negative: this model's loss is lower than the first model's in that bucket
        m["delta_vs_first"] = [None if a is None or b is None else b - a for a, b in zip(first, m["loss"])]
    return {"corpus": str(corpus_dir), "tokens": int(targets.size), "seq_len": seq_len,
            "train_tokens": int(counts.sum()), "edges": e,
            "measure": "mean next-token cross-entropy (nats) of validation targets, by the target id's training count",
            "buckets": buckets, "models": out}


def plot_token_freq(report: dict[str, Any]):
    """Grouped bars of mean loss per bucket per model (empty buckets left out); with several models a
    second panel shows each model's difference to the first, where the effect of a memory is visible."""
    from matplotlib.figure import Figure

    models = report["models"]
    keep = [i for i, b in enumerate(report["buckets"]) if b["val_targets"]]
    fig = Figure(figsize=(7.2, 6.4 if len(models) > 1 else 4.2), layout="constrained")
    axes = fig.subplots(2 if len(models) > 1 else 1, 1, sharex=True, squeeze=False)[:, 0]
    width = 0.8 / len(models)

    def bars(ax, rows, key, labels):
        for j, (m, label) in enumerate(zip(rows, labels)):
            xs = [k + (j - (len(rows) - 1) / 2) * width for k in range(len(keep))]
            ax.bar(xs, [m[key][i] for i in keep], width=width, label=label, color=f"C{models.index(m)}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)

    bars(axes[0], models, "loss", [f"{m['label']} (all: {m['loss_all']:.3f})" for m in models])
    top = max(m["loss"][i] for m in models for i in keep)
    axes[0].set_ylim(0, top * 1.2)  # room for the legend above the bars
    axes[0].set_ylabel("validation loss (nats)")
    axes[0].set_title(f"validation loss by target-token frequency ({report['tokens']:,} tokens)")
    if len(models) > 1:
        bars(axes[1], models[1:], "delta_vs_first", [f"{m['label']} - {models[0]['label']}" for m in models[1:]])
        axes[1].axhline(0, color="black", linewidth=0.8)
        axes[1].set_ylabel("loss difference (nats)")
    axes[-1].set_xticks(range(len(keep)), [f"{report['buckets'][i]['label']}\nn={report['buckets'][i]['val_targets']:,}" for i in keep],
                        fontsize=8)
    axes[-1].set_xlabel("training count of the target token")
    return fig
