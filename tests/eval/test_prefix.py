"""The shared-prefix loss path's pieces: where the prefix stops and how rows are bucketed."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_base

from romscale.eval.generate import pad_right, target_token_losses
from romscale.eval.prefix import length_buckets, prefix_shared_losses, shared_prefix_len
from romscale.eval.prompting import IGNORE

I = IGNORE


def test_prefix_stops_before_the_first_predicting_position():
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8, 9]]
    assert shared_prefix_len(seqs, [[I] * 4 + [5, 6], [I] * 5 + [8, 9]]) == 3  # position 3 predicts token 4 of row 0
    assert shared_prefix_len(seqs, [[I] * 6, [I] * 7]) == 4  # no targets: the common tokens, one left each
    assert shared_prefix_len([[1, 2], [3, 2]], [[I, 2], [I, 2]]) == 0
    assert shared_prefix_len([[1, 2, 3]], [[I, I, 3]]) == 1  # one example: up to the cap
    assert shared_prefix_len([[5, 6, 7], [5, 6, 7]], [[I, I, I], [I, I, I]]) == 2  # identical rows keep a token


def _cost(groups, lengths, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("lengths", [[5], [30, 4, 4, 5, 90, 91, 3], [10] * 9, [200, 1, 150, 2, 100, 3]])
@pytest.mark.parametrize("max_batch", [1, 3, 16])
def test_length_buckets_are_optimal_and_cover_every_row(lengths, max_batch):
    groups = length_buckets(lengths, max_batch, overhead=20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= max_batch for g in groups)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = min(  # every split of the sorted order into consecutive batches
        _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, 20)
        for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r)
        if all(b - a <= max_batch for a, b in zip((0, *cuts), (*cuts, len(order)))))
    assert _cost(groups, lengths, 20) == best


@pytest.mark.parametrize("prefix", [0, 6])
def test_prefix_shared_losses_equal_the_full_forward(prefix):
    model = tiny_base("llama", seed=3).eval()
    g = torch.Generator().manual_seed(0)
    head = torch.randint(5, 60, (prefix,), generator=g).tolist()
    seqs, labels = [], []
    for n_in, n_out in ((3, 4), (9, 2), (1, 6), (5, 5)):
        body = torch.randint(5, 60, (n_in + n_out,), generator=g).tolist()
        seqs.append(head + body)
        labels.append([I] * (prefix + n_in) + body[n_in:])
    sums = prefix_shared_losses(model, seqs, labels, pad_id=0, max_batch=2, device=torch.device("cpu"))
    for i in range(len(seqs)):
        ids, mask, lab = pad_right([seqs[i]], [labels[i]], 0)
        with torch.no_grad():
            ce, _ = target_token_losses(model, ids, mask, lab)
        assert float(sums[i, 1]) == ce.numel()
        assert float(sums[i, 0]) == pytest.approx(float(ce.double().sum()), rel=1e-5)
