"""The order of a bank's modules: the model's module order (`model.named_modules()`).

It matters because PEFT's add_weighted_adapter visits modules in that order and draws its DARE masks
from one global random stream as it goes; sorted names (k_proj, o_proj, q_proj, v_proj) would draw
the same masks for different modules. An adapter file does not record the order (safetensors sorts
its keys), so without the model we use the order in which transformers' decoders declare their
submodules (attention before MLP; q, k, v, o; gate, up, down; ...). That is exact for the Llama
family (Llama, Mistral, Qwen, Gemma, SmolLM, ...); for a model declared otherwise (e.g. OPT's k, v,
q or Phi-3's o before qkv) pass `module_order` taken from the model (`model_order`).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from romscale.errors import AdapterError

# Sibling names in the order transformers declares them (a name shared by two parents, such as
# GPT-2's c_proj in attn and mlp, is placed after every sibling it has in either).
_DECLARED = (
    "self_attn", "attn", "attention", "self_attention", "mlp", "feed_forward", "block_sparse_moe",
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "o_proj", "out_proj",
    "dense_h_to_4h", "dense_4h_to_h", "dense",
    "gate_proj", "up_proj", "gate_up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3",
)
_RANK = {name: i for i, name in enumerate(_DECLARED)}
_HEADS = ("lm_head", "score", "classifier")  # declared after the backbone


def _part_key(part: str) -> tuple:
    if part.isdigit():
        return (0, int(part), "")
    if part in _HEADS:
        return (3, 0, part)
    if part in _RANK:
        return (1, _RANK[part], "")
    return (2, 0, part)  # unknown siblings: after the known ones, alphabetically


def declaration_key(module: str) -> tuple:
    """Sort key of a module path in the standard declaration order (layers.2 before layers.10)."""
    return tuple(_part_key(p) for p in module.split("."))


def natural_key(name: str) -> list:
    """Sort key that orders `layers.2` before `layers.10` (numbers compared as numbers)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


def default_order(modules: Iterable[str]) -> list[str]:
    return sorted(modules, key=declaration_key)


def model_order(model, modules: Iterable[str]) -> list[str]:
    """`modules` in `model.named_modules()` order (a PeftModel's wrapped model is used)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    wanted = set(modules)
    order = [n for n, _ in model.named_modules() if n in wanted]
    missing = sorted(wanted - set(order), key=natural_key)
    if missing:
        raise AdapterError(f"the model has no modules {missing[:3]}; is it the adapters' base model?")
    return order


def check_order(order: Sequence[str], modules: Iterable[str]) -> list[str]:
    """An explicit module order must list every adapted module exactly once."""
    order, have = list(order), set(modules)
    if len(set(order)) != len(order) or set(order) != have:
        extra, missing = sorted(set(order) - have)[:3], sorted(have - set(order))[:3]
        raise AdapterError(f"module_order must list each adapted module once (missing {missing}, unknown {extra})")
    return order
