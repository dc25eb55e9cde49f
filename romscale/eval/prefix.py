"""Target-token losses of one task's examples with their shared prompt prefix run once.

The examples of a task start with the same tokens (chat template, system prompt, instruction):
38-70 of 50-340 tokens on the cpu-16 bank. D2C scores a task's n examples under many adapters, and
on a CPU a forward costs in proportion to the tokens it carries, padding included. So the common
prefix runs once (batch 1) into a KV cache, and the rest of each example runs on top of a copy of
that cache, in length buckets that trade padding against the fixed cost of a forward. The loss is
the same as the full forward's (`romscale.eval.generate.target_token_losses`) up to float
summation order: the prefix stops before the first position whose hidden state predicts a target.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from romscale.eval.prompting import IGNORE

# A forward of a 135M model on this class of CPU costs about as much as 64 more tokens in it
# (measured: 0.15 s fixed, ~2 ms per token at 2 threads), so a bucket is split where that saves.
FORWARD_OVERHEAD_TOKENS = 64


def shared_prefix_len(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> int:
    """Length P of the common token prefix, capped so that position P - 1 and earlier predict no
    target (every example keeps at least one token, and all its targets, after the prefix)."""
    first_target = min(next((j for j, x in enumerate(lb) if x != IGNORE), len(lb)) for lb in labels)
    cap = min(first_target - 1, min(len(s) for s in seqs) - 1)
    p = 0
    while p < cap and len({s[p] for s in seqs}) == 1:
        p += 1
    return max(p, 0)


def length_buckets(lengths: Sequence[int], max_batch: int, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of at most `max_batch` rows, minimising
    sum(overhead + rows x longest) over batches (exact DP over the lengths sorted longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    m = len(order)
    best = [0.0] + [float("inf")] * m  # best[j]: cost of the first j rows of `order`
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(max(0, j - max_batch), j):  # rows i..j-1 in one batch; its longest is order[i]
            c = best[i] + overhead + (j - i) * lengths[order[i]]
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], m
    while j > 0:
        out.append(order[cut[j]: j])
        j = cut[j]
    return out[::-1]


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """transformers 5.x renamed the decoder's `past_key_values` argument to `cache`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@torch.no_grad()
def prefix_shared_losses(model: torch.nn.Module, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                         pad_id: int, max_batch: int, device: torch.device) -> torch.Tensor:
    """Per-example sums of target-token cross-entropy and target counts, shape (len(seqs), 2),
    float64 on the CPU, for sequences that share a prefix (one task's examples)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    kw = _cache_kwarg(decoder)
    p = shared_prefix_len(seqs, labels)
    prefix = DynamicCache(config=model.config)
    if p > 0:
        decoder(input_ids=torch.tensor([list(seqs[0][:p])], device=device), use_cache=True, **{kw: prefix})
    out = torch.zeros(len(seqs), 2, dtype=torch.float64)
    for rows in length_buckets([len(s) - p for s in seqs], max_batch):
        n = max(len(seqs[i]) - p for i in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), p + n), dtype=torch.long)
        lab = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask[:, :p] = 1
        for r, i in enumerate(rows):
            s = seqs[i][p:]
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, p: p + len(s)] = 1
            lab[r, : len(s)] = torch.tensor(labels[i][p:])
        cache = copy.deepcopy(prefix)
        if p > 0 and len(rows) > 1:
            cache.batch_repeat_interleave(len(rows))
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                         **{kw: cache}).last_hidden_state
        nxt = lab[:, 1:].to(device)  # suffix position s predicts token p + s + 1
        keep = nxt != IGNORE
        ce = F.cross_entropy(head(hidden[:, :-1][keep]).float(), nxt[keep], reduction="none")
        which = torch.arange(len(rows), device=device)[:, None].expand_as(nxt)[keep].cpu()
        idx = torch.tensor(rows)[which]
        out[:, 0].index_add_(0, idx, ce.double().cpu())
        out[:, 1].index_add_(0, idx, torch.ones_like(ce, dtype=torch.float64).cpu())
    return out
