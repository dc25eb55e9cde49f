"""TaskEvaluator: score a task bank's examples with whatever adapter sits in an AdapterSlot.

- `generate`: batched greedy decoding, left-padded (positions follow the attention mask, so a
  batch gives the tokens each prompt gives alone), stopping at EOS or the chat's end-of-turn token;
  only the new tokens are decoded, stripped.
- `score`: generate, then the task's metric (romscale.eval.metrics), 0..100.
- `losses`: mean target-token cross-entropy per (task, examples) item. Items are packed into
  batches of up to `batch_size` sequences across tasks (the adapter in the slot is the same for
  all), and the LM head runs only on the positions that predict a target token: for a 49k-token
  vocabulary that head is most of a short forward's work.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from romscale.errors import AdapterError
from romscale.eval.prompting import (
    IGNORE,
    encode_example,
    encode_prompt,
    stop_token_ids,
)
from romscale.eval.prefix import prefix_shared_losses
from romscale.eval.slot import QKVO, AdapterSlot


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device type when asked, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def pad_right(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) padded on the right (labels IGNORE on the padding)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, mask, lab


def target_token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy at the target positions of a right-padded batch, and the row of each.

    The decoder runs on the whole batch, the LM head only where the next label is a target (the
    same loss as HF's `labels=` forward, without logits for prompt and padding positions)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    nxt = labels[:, 1:]
    keep = nxt != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    ce = F.cross_entropy(logits.float(), nxt[keep], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(nxt)[keep]
    return ce, rows


class TaskEvaluator:
    """Generation, scores and losses on a bank's tasks through one loaded model and its slot."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, slot: AdapterSlot, batch_size: int = 16,
                 device: torch.device | str | None = None, bf16: bool = False, max_len: int = 512) -> None:
        self.slot = slot
        self.model = slot.base  # the base model with the slot's LoRA layers injected in place
        if model is not slot.base and model is not slot.peft_model:
            raise ValueError("TaskEvaluator: `model` must be the model the slot wraps")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.bf16 = bf16
        self.max_len = max_len
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, task: Any, examples: Sequence[Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy replies to `examples` of `task`, in order (batches of `batch_size`, left padding)."""
        return self.generate_many([(task, examples)], max_new_tokens)[0]

    @torch.no_grad()
    def generate_many(self, items: Sequence[tuple[Any, Sequence[Any]]], max_new_tokens: int | None = None) -> list[list[str]]:
        """Greedy replies for several (task, examples) items under the adapter now in the slot.

        Rows of all items share batches, ordered by reply budget then prompt length (less padding,
        fewer wasted decode steps); each row is cut at its own task's `max_new_tokens`. Greedy
        decoding of a row does not depend on its batch mates (left padding, masked attention)."""
        rows: list[tuple[int, int, list[int], int]] = []  # (item, example index, prompt ids, reply budget)
        for k, (task, examples) in enumerate(items):
            new = int(max_new_tokens if max_new_tokens is not None else task.max_new_tokens)
            for j, ex in enumerate(examples):
                rows.append((k, j, encode_prompt(self.tokenizer, task, ex, self.max_len - new), new))
        out: list[list[str]] = [[""] * len(examples) for _, examples in items]
        order = sorted(range(len(rows)), key=lambda i: (rows[i][3], len(rows[i][2])))
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            batch = [rows[i] for i in order[start: start + self.batch_size]]
            n = max(len(r[2]) for r in batch)
            new = max(r[3] for r in batch)
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, n - len(r[2]):] = torch.tensor(r[2])
                mask[i, n - len(r[2]):] = 1
            with autocast_context(self.device, self.bf16):
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=new,
                    do_sample=False, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                    temperature=None, top_p=None, top_k=None,
                )
            for r, reply in zip(batch, gen[:, n:].tolist()):
                reply = reply[: r[3]]
                cut = next((j for j, t in enumerate(reply) if t in self.stop_ids), len(reply))
                out[r[0]][r[1]] = self.tokenizer.decode(reply[:cut], skip_special_tokens=True).strip()
        return out

    def score(self, task: Any, examples: Sequence[Any]) -> dict[str, Any]:
        """{"score": 0..100 under the task's metric, "n", "metric", "predictions"}."""
        return self.score_many([(task, examples)])[0]

    def score_many(self, items: Sequence[tuple[Any, Sequence[Any]]]) -> list[dict[str, Any]]:
        """`score` for several (task, examples) items, their generations batched together."""
        from romscale.eval.metrics import score

        preds = self.generate_many(items)
        return [{"score": float(score(task.metric, p, [ex.target for ex in examples], labels=task.labels)),
                 "n": len(examples), "metric": task.metric, "predictions": p}
                for (task, examples), p in zip(items, preds)]

    # -- losses -----------------------------------------------------------------------------------
    @torch.no_grad()
    def losses(self, items: Sequence[tuple[Any, Sequence[Any]]], share_prefix: bool = False) -> list[float]:
        """Mean target-token cross-entropy (nats) of each (task, examples) item, with the adapter
        now in the slot. Sequences of all items are batched together, longest first; with
        `share_prefix`, each item's common prompt prefix runs once instead (romscale.eval.prefix:
        fewer tokens, the better trade on a CPU; the same losses up to float rounding)."""
        seqs: list[tuple[int, list[int], list[int]]] = []
        for k, (task, examples) in enumerate(items):
            if not examples:
                raise ValueError(f"losses: task {getattr(task, 'name', k)!r} has no examples")
            for ex in examples:
                ids, lab = encode_example(self.tokenizer, task, ex, self.max_len)
                seqs.append((k, ids, lab))
        self.model.eval()
        if share_prefix:
            out = []
            for k in range(len(items)):
                mine = [s for s in seqs if s[0] == k]
                with autocast_context(self.device, self.bf16):
                    sums = prefix_shared_losses(self.model, [s[1] for s in mine], [s[2] for s in mine], self.pad_id,
                                                self.batch_size, self.device)
                out.append(float(sums[:, 0].sum() / sums[:, 1].sum()))
            return out
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][1]))  # similar lengths share a batch: less padding
        total = torch.zeros(len(items), dtype=torch.float64)
        count = torch.zeros(len(items), dtype=torch.float64)
        for start in range(0, len(order), self.batch_size):
            batch = [seqs[i] for i in order[start: start + self.batch_size]]
            ids, mask, lab = pad_right([b[1] for b in batch], [b[2] for b in batch], self.pad_id)
            with autocast_context(self.device, self.bf16):
                ce, rows = target_token_losses(self.model, ids.to(self.device), mask.to(self.device), lab.to(self.device))
            item = torch.tensor([b[0] for b in batch])[rows.cpu()]
            total.index_add_(0, item, ce.double().cpu())
            count.index_add_(0, item, torch.ones_like(ce, dtype=torch.float64).cpu())
        return (total / count).tolist()


def evaluate_bank(bank: Any, model: torch.nn.Module, tokenizer: Any, methods: dict[str, dict[str, Any]], *,
                  split: str = "test", limit: int | None = None, loss_examples: int = 5, batch_size: int = 16,
                  bf16: bool = False, progress: bool = False) -> dict[str, Any]:
    """Score every task of `bank` under every method with ONE loaded model.

    `methods`: method name -> {task name: LoraAdapter or None (the base model)}; a task missing from
    a method's map is not evaluated under it. Per task and method: the metric's score on `split`
    (the first `limit` examples), n, and the mean target-token loss on the first `loss_examples`
    val examples. The slot is sized to the largest rank and covers every adapted module."""
    import time

    from tqdm.auto import tqdm

    adapters = [a for per in methods.values() for a in per.values() if a is not None]
    modules = sorted({m for a in adapters for m in a.modules})
    rank = max((lm.r for a in adapters for lm in a.modules.values()), default=1)
    known = {n for n, _ in model.named_modules()}
    for a in adapters:
        extra = sorted(set(a.modules) - known)
        if extra:
            raise AdapterError(f"adapter {a.source or a.name}: adapts modules the base model does not have ({extra[:3]}); "
                               "was it trained on another base model?")
    slot = AdapterSlot(model, target_modules=modules or QKVO, rank=rank)
    ev = TaskEvaluator(model, tokenizer, slot, batch_size=batch_size, bf16=bf16)
    results: dict[str, Any] = {}
    jobs = [(m, t) for m, per in methods.items() for t in bank.names if t in per]
    bar = tqdm(total=len(jobs), desc="evaluate", disable=not progress)
    for method, per in methods.items():
        rows: dict[str, Any] = {}
        for name in bank.names:
            if name not in per:
                continue
            task = bank.task(name)
            slot.set(per[name])
            t0 = time.perf_counter()
            examples = task.examples(split, limit)
            if not examples:
                raise AdapterError(f"task {name}: no {split} examples to evaluate")
            r = ev.score(task, examples)
            val = task.examples("val", loss_examples) if loss_examples else []
            r["loss"] = ev.losses([(task, val)])[0] if val else None
            r["loss_n"] = len(val)
            r["adapter"] = None if per[name] is None else str(per[name].source or per[name].name)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            rows[name] = r
            bar.update(1)
        scores = [r["score"] for r in rows.values()]
        results[method] = {"tasks": rows, "mean_score": sum(scores) / len(scores) if scores else None}
    bar.close()
    slot.set(None)
    return results
