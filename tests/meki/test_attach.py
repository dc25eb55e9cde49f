"""Attaching MeKi to real transformers models: retrofit identity, training, every call path."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import VOCAB, randomize_meki, tiny_base
from romscale.errors import RomscaleError, UnsupportedModelError
from romscale.meki.attach import attach_meki, detach_meki, meki_branches
from romscale.meki.config import POSITIONS, MekiConfig


def test_retrofit_keeps_logits(family, ids):
    model = tiny_base(family)
    with torch.no_grad():
        ref = model(ids).logits
    attach_meki(model, MekiConfig(d_mem=8))
    with torch.no_grad():
        out = model(ids).logits
    assert len(meki_branches(model)) == 2
    assert (out - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("position", POSITIONS)
def test_training_moves_every_meki_parameter(position, ids):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8, position=position))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".meki." in n}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if ".meki." in n], lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"parameters never updated: {unchanged}"
    # The dynamic path reaches the shared word embedding (gradients flow into E through G).
    emb = model.get_input_embeddings().weight
    loss = model(input_ids=ids, labels=ids).loss
    grad = torch.autograd.grad(loss, emb)[0]
    assert grad.abs().sum() > 0


def _greedy_no_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("position", POSITIONS)
def test_generate_with_kv_cache_sees_the_right_ids(family, position):
    model = tiny_base(family)
    attach_meki(model, MekiConfig(d_mem=8, position=position))
    randomize_meki(model)
    prompt = torch.tensor([[5, 17, 33, 8, 41]])
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, _greedy_no_cache(model, prompt, 8))


def test_left_padded_batch_matches_single_rows():
    model = tiny_base("qwen3")
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    a = torch.tensor([9, 10, 11, 12, 13, 14])
    b = torch.tensor([20, 21, 22])
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])  # pad id 0, left side
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, seq in enumerate((a, b)):
        single = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, -6:], single[0, -6:])


def test_unsupported_architecture_names_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        attach_meki(gpt2, MekiConfig(d_mem=8))


def test_inputs_embeds_is_a_clear_error(ids):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8))
    with pytest.raises(RomscaleError, match="input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids))


def test_attach_twice_and_detach(ids):
    model = tiny_base("mistral")
    with torch.no_grad():
        ref = model(ids).logits
    attach_meki(model, MekiConfig(d_mem=8))
    with pytest.raises(RomscaleError, match="already"):
        attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    detach_meki(model)
    assert not any(".meki." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_selected_layers_only(ids):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8, layers=(1,)))
    assert [i for i, _ in meki_branches(model)] == [1]
