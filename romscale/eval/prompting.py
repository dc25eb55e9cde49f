"""Prompts and training examples, one definition for training and evaluation.

A task's user message (`task.prompt(example)`) goes through the tokenizer's chat template with the
generation prompt (ChatML for SmolLM2: `<|im_start|>user ... <|im_end|>\n<|im_start|>assistant\n`);
a tokenizer without a template gets the text plus a newline. The target is the assistant's reply
followed by the token that ends a turn (`<|im_end|>` under ChatML, else EOS), so a trained adapter
learns to stop where generation stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from romscale.errors import RomscaleError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of positions that carry no loss (PyTorch's cross_entropy ignore_index)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The prompt string the model sees for user message `text` (generation prompt included)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text + "\n"


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends the assistant's turn: the first special token the chat template writes
    after a reply (`<|im_end|>` for ChatML), else EOS."""
    if has_chat_template(tokenizer):
        probe = "xq"
        msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": probe}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = full[full.rfind(probe) + len(probe):]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        special = set(getattr(tokenizer, "all_special_ids", []))
        if ids and ids[0] in special:
            return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise RomscaleError("the tokenizer has neither a chat template that ends a turn with a special token nor an EOS token")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Generation stops at any of these: the end-of-turn token and EOS."""
    ids = {end_token_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, task: Any, example: Any, max_len: int | None = None) -> list[int]:
    """Token ids of the rendered prompt; longer than `max_len`, its start is cut (the end holds the
    input's last words and the generation prompt, which the reply depends on most)."""
    text = render_prompt(tokenizer, task.prompt(example))
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    if max_len is not None and len(ids) > max_len:
        ids = ids[len(ids) - max_len:]
    return list(ids)


def encode_example(tokenizer: PreTrainedTokenizerBase, task: Any, example: Any, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training / loss example: labels are IGNORE on the prompt and the
    target's ids (plus the end-of-turn token) on the reply. Over `max_len` tokens, the target keeps
    what the prompt leaves, but at least half of `max_len`, and the prompt is cut at its start."""
    if max_len < 2:
        raise RomscaleError(f"max_len must be at least 2 (a prompt token and a target token); got {max_len}")
    target = list(tokenizer(example.target, add_special_tokens=False)["input_ids"]) + [end_token_id(tokenizer)]
    prompt = encode_prompt(tokenizer, task, example)
    if len(prompt) + len(target) > max_len:
        target = target[: max(1, min(len(target), max(max_len - len(prompt), max_len // 2)))]
        prompt = prompt[len(prompt) - (max_len - len(target)):]
    return prompt + target, [IGNORE] * len(prompt) + target
