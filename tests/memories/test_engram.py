"""Engram specifics: hashed n-gram ids (prime moduli, heads, history across decode steps), the gate,
the causal convolution's state under a KV cache, and the recorder's refusal of a foreign cache."""

import pytest
import torch
from conftest import tiny_base

from romscale.errors import RomscaleError
from romscale.memories.base import PAD_ID, get_memory, id_recorder
from romscale.memories.engram import EngramConfig, NgramHasher, engram_state, primes_from

CFG = EngramConfig(layers=(1,), rows_per_head=13, heads=2, d_head=4)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".engram." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() <= 1 else 0.0))


def test_moduli_are_distinct_primes_and_ids_stay_in_their_head():
    cfg = EngramConfig(rows_per_head=100, heads=3)
    assert cfg.moduli == [101, 103, 107, 109, 113, 127] == primes_from(100, 6)
    h = NgramHasher(cfg)
    ctx = torch.randint(0, 500, (3, 2 + 40))
    ctx[:, :2] = PAD_ID
    ids = h(ctx, keep=2)
    assert ids.shape == (3, 40, cfg.n_tables)
    lo = torch.tensor([0] + torch.tensor(cfg.moduli).cumsum(0)[:-1].tolist())
    hi = lo + torch.tensor(cfg.moduli)
    assert ((ids >= lo) & (ids < hi)).all()
    assert int(ids.max()) < cfg.total_rows


def test_ids_depend_on_exactly_the_n_gram():
    h = NgramHasher(EngramConfig(orders=(2, 3), heads=1, rows_per_head=10007))
    base = torch.tensor([[PAD_ID, PAD_ID, 5, 6, 7, 8]])
    ids = h(base, keep=2)  # (1, 4, 2): columns = 2-gram head, 3-gram head
    changed = base.clone()
    changed[0, 3] = 60  # token at position 1
    ids2 = h(changed, keep=2)
    # 2-grams ending at positions 1 and 2 contain it, the 3-grams at 1, 2 and 3.
    assert (ids[0, :, 0] != ids2[0, :, 0]).tolist() == [False, True, True, False]
    assert (ids[0, :, 1] != ids2[0, :, 1]).tolist() == [False, True, True, True]
    # A repeated n-gram gets the same row wherever it occurs.
    rep = h(torch.tensor([[PAD_ID, PAD_ID, 5, 6, 9, 5, 6]]), keep=2)
    assert torch.equal(rep[0, 1, 0], rep[0, 4, 0])


def test_hash_heads_differ():
    h = NgramHasher(EngramConfig(orders=(2,), heads=2, rows_per_head=10007))
    ids = h(torch.randint(0, 90, (1, 1 + 50)), keep=1)
    local = ids - torch.tensor([0, 10007])
    assert not torch.equal(local[..., 0], local[..., 1])


def test_decode_step_sees_the_previous_tokens():
    model = tiny_base("llama")
    get_memory("engram").attach(model, CFG)
    state = engram_state(model)
    seq = torch.tensor([[5, 17, 33, 8, 41, 12]])
    with torch.no_grad():
        model(input_ids=seq)
        full = state.row_ids.clone()
        out = model(input_ids=seq[:, :4], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = []
        for t in (4, 5):
            out = model(input_ids=seq[:, t : t + 1], cache=cache, use_cache=True, attention_mask=torch.ones(1, t + 1, dtype=torch.long))
            steps.append(state.row_ids.clone())
    assert torch.equal(torch.cat(steps, 1), full[:, 4:])
    assert id_recorder(model).seen == 6


def test_cached_logits_equal_full_forward_step_by_step():
    model = tiny_base("qwen2")
    get_memory("engram").attach(model, EngramConfig(layers=(0, 1), rows_per_head=13, heads=2, d_head=4, kernel=3))
    _randomize(model)
    seq = torch.tensor([[5, 17, 33, 8, 41, 12, 7, 7, 9, 30, 31, 2]])
    with torch.no_grad():
        ref = model(input_ids=seq, use_cache=False).logits
        out = model(input_ids=seq[:, :3], use_cache=True)
        got = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(3, seq.shape[1]):
            out = model(input_ids=seq[:, t : t + 1], cache=cache, use_cache=True)
            got.append(out.logits)
    assert (torch.cat(got, 1) - ref).abs().max() < 1e-4  # the conv state and the id history carry over


def test_a_foreign_cache_is_refused():
    model = tiny_base("llama")
    get_memory("engram").attach(model, CFG)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))  # another sequence in between
        with pytest.raises(RomscaleError, match="continues a KV cache"):
            model(input_ids=torch.tensor([[8]]), cache=cache, use_cache=True)


def test_gate_is_computed_from_the_hidden_state():
    model = tiny_base("llama")
    get_memory("engram").attach(model, CFG)
    _randomize(model)
    branch = model.model.layers[1].engram
    e = torch.randn(1, 5, CFG.n_tables * CFG.d_head)
    valid = torch.ones(1, 5, dtype=torch.bool)
    h1, h2 = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        y1, y2 = branch(h1, e, valid, True), branch(h2, e, valid, True)
        # By hand: s = <norm(h), norm(W_k e)> / sqrt(d), alpha = sigmoid(sign(s) sqrt|s|), V = alpha W_v e, Y = silu(conv(norm V)) + V.
        score = (branch.query_norm(h1) * branch.key_norm(branch.key(e))).sum(-1, keepdim=True) / 32**0.5
        alpha = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
        v = alpha * branch.value(e)
        x = torch.nn.functional.pad(branch.conv_norm(v).transpose(1, 2), (branch.span, 0))
        y = torch.nn.functional.conv1d(x, branch.conv, groups=32, dilation=3).transpose(1, 2)
    assert torch.allclose(y1, torch.nn.functional.silu(y) + v, atol=1e-6)
    assert not torch.allclose(y1, y2)


def test_config_checks():
    with pytest.raises(RomscaleError, match="orders"):
        EngramConfig(orders=(1, 2))
    with pytest.raises(RomscaleError, match="layers"):
        EngramConfig(layers=None)
    with pytest.raises(RomscaleError, match="heads"):
        EngramConfig(heads=0)
    with pytest.raises(RomscaleError, match="outside"):
        get_memory("engram").attach(tiny_base("llama"), EngramConfig(layers=(5,)))
