"""Prompting, batched generation and target-token losses on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import hf_tokenizer, tiny_base
from peft import PeftModel

from romscale.adapters.peft_io import read_peft_adapter
from romscale.data.taskbank import Example, TaskBank, write_task_bank
from romscale.eval.generate import TaskEvaluator
from romscale.eval.metrics import score as metric_score
from romscale.eval.prompting import (
    IGNORE,
    encode_example,
    encode_prompt,
    end_token_id,
    render_prompt,
)
from romscale.eval.prefix import shared_prefix_len
from romscale.eval.slot import AdapterSlot

WORDS = "the cat sat on a mat and then ran off to see her old friend who lives by the river".split()


def _examples(prefix: str, n: int, start: int, labels=None):
    out = []
    for i in range(n):
        k = start + i
        text = " ".join(WORDS[(k * 3 + j) % len(WORDS)] for j in range(1 + k % 7))  # lengths 1..7 words
        target = labels[k % len(labels)] if labels else " ".join(reversed(text.split()))
        out.append(Example(id=f"{prefix}{k}", input=f"{text} {k}", target=target))
    return out


def spec(name: str, metric: str, labels=None, max_new_tokens: int = 6):
    return {"name": name, "family": "toy", "language": "en", "metric": metric, "template": "Reverse this.\n{input}",
            "labels": labels, "max_new_tokens": max_new_tokens, "sizes": {}, "source": "synthetic", "license": "CC0"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bank"
    lab = ["yes", "no"]
    tasks = [
        (spec("rev-en", "exact_match"), {"train": _examples("a", 8, 0), "val": _examples("a", 4, 100), "test": _examples("a", 6, 200)}),
        (spec("yes-en", "accuracy", lab), {"train": _examples("b", 8, 0, lab), "val": _examples("b", 4, 100, lab),
                                           "test": _examples("b", 5, 200, lab)}),
    ]
    write_task_bank(tasks, out)
    return TaskBank.open(out)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer():
    tok = hf_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_prompt_and_labels(bank):
    task = bank.task("rev-en")
    ex = task.examples("train")[3]
    plain = hf_tokenizer()
    assert render_prompt(plain, "hi") == "hi\n"
    ids, labels = encode_example(plain, task, ex, max_len=128)
    prompt = encode_prompt(plain, task, ex)
    target = plain(ex.target, add_special_tokens=False)["input_ids"]
    assert ids == prompt + target + [plain.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + target + [plain.eos_token_id]

    chat = chat_tokenizer()
    assert render_prompt(chat, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    end = chat.convert_tokens_to_ids("<|im_end|>")
    assert end_token_id(chat) == end != chat.eos_token_id
    ids, labels = encode_example(chat, task, ex, max_len=128)
    assert ids[-1] == end and labels[-1] == end
    assert chat.decode([t for t in labels if t != IGNORE][:-1]) == ex.target
    # too long: the target keeps at least half, the prompt loses its start, the length is max_len
    ids, labels = encode_example(chat, task, ex, max_len=12)
    assert len(ids) == len(labels) == 12 and IGNORE in labels and labels[-1] != IGNORE
    assert sum(t != IGNORE for t in labels) >= 6 or sum(t != IGNORE for t in labels) == len(target) + 1


def _ev(make_model, batch_size, adapter=None, tok=None):
    slot = AdapterSlot(make_model(0), rank=4)
    if adapter is not None:
        slot.set(read_peft_adapter(adapter))
    return TaskEvaluator(slot.base, tok or hf_tokenizer(), slot, batch_size=batch_size)


def _base(seed):
    return tiny_base("llama", seed, tie=False)  # 96 tokens, all decodable; untied: not an echo of the last token


def test_batched_generation_equals_one_at_a_time(bank, make_lora, tmp_path):
    task = bank.task("rev-en")
    exs = task.examples("test")  # prompts of different lengths: left padding is exercised
    assert len({len(encode_prompt(hf_tokenizer(), task, e)) for e in exs}) > 2
    lora = make_lora(tmp_path / "h32", seed=7, hidden=32)  # fits tiny_base's 32-wide modules
    for adapter in (None, lora):
        batched = _ev(_base, 4, adapter).generate(task, exs)
        single = [_ev(_base, 1, adapter).generate(task, [e])[0] for e in exs]
        assert batched == single
        assert any(batched) and all(p == p.strip() for p in batched)


def test_generate_many_batches_tasks_together(bank, make_lora, tmp_path):
    """Rows of two tasks with different reply budgets share batches: each row gets what its task
    alone gives, cut at its own budget; score_many equals score per task."""
    rev, yes = bank.task("rev-en"), bank.task("yes-en")
    short = dataclasses.replace(yes, max_new_tokens=2)
    assert short.examples("test")
    lora = make_lora(tmp_path / "h32m", seed=3, hidden=32)
    ev = _ev(_base, 3, lora)
    items = [(rev, rev.examples("test")), (short, short.examples("test"))]
    together = ev.generate_many(items)
    alone = [_ev(_base, 1, lora).generate(t, exs) for t, exs in items]
    assert together == alone
    assert [r["score"] for r in ev.score_many(items)] == [ev.score(t, exs)["score"] for t, exs in items]


def test_generation_is_greedy_new_tokens_and_stops(bank):
    task = bank.task("rev-en")
    ex = task.examples("test")[0]
    ev = _ev(_base, 2)
    tok = ev.tokenizer
    ids = torch.tensor([encode_prompt(tok, task, ex)])
    with torch.no_grad():  # reference: argmax on full forwards, no cache
        for _ in range(task.max_new_tokens):
            nxt = ev.model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) in ev.stop_ids:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    n_prompt = len(encode_prompt(tok, task, ex))
    assert ev.generate(task, [ex]) == [tok.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()]
    with torch.no_grad():  # an EOS-loving head: every reply stops at once and is empty
        ev.model.get_output_embeddings().weight[tok.eos_token_id] += 100.0
    assert ev.generate(task, task.examples("test")) == [""] * 6


def test_score_uses_the_task_metric(bank):
    ev = _ev(_base, 3)
    for name in bank.names:
        task = bank.task(name)
        exs = task.examples("test")
        r = ev.score(task, exs)
        assert r["n"] == len(exs) and r["metric"] == task.metric and len(r["predictions"]) == len(exs)
        assert r["score"] == metric_score(task.metric, r["predictions"], [e.target for e in exs], labels=task.labels)


def _hf_loss(model, tok, task, exs, max_len=512):
    enc = [encode_example(tok, task, e, max_len) for e in exs]
    n = max(len(i) for i, _ in enc)
    ids = torch.full((len(enc), n), tok.pad_token_id)
    lab = torch.full((len(enc), n), IGNORE)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for r, (i, lb) in enumerate(enc):
        ids[r, : len(i)], lab[r, : len(lb)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lb), 1
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=lab).loss)


@pytest.mark.parametrize("tok_kind", ["plain", "chat"])
def test_losses_equal_hf_labels_forward(bank, tiny_llama, lib4, tok_kind):
    tok = hf_tokenizer() if tok_kind == "plain" else chat_tokenizer()
    ev = _ev(tiny_llama, 3, lib4[1], tok)  # 3 per batch: the two tasks share batches
    a, b = bank.task("rev-en"), bank.task("yes-en")
    items = [(a, a.examples("val")), (b, b.examples("val")[:3]), (a, a.examples("test")[:2])]
    got = ev.losses(items)
    ref_model = PeftModel.from_pretrained(tiny_llama(0), str(lib4[1])).eval()
    ref = [_hf_loss(ref_model, tok, t, exs) for t, exs in items]
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert ev.losses(items[1:2]) == pytest.approx(got[1:2], rel=1e-6)  # independent of what else is in the batch
    enc = [encode_example(tok, a, ex, 512) for ex in a.examples("val")]
    assert shared_prefix_len([e[0] for e in enc], [e[1] for e in enc]) >= 3  # the template is a real shared prefix
    assert ev.losses(items, share_prefix=True) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    ev.bf16 = True
    assert ev.losses(items) == pytest.approx(ref, rel=0.05)
    with pytest.raises(ValueError, match="no examples"):
        ev.losses([(a, [])])
