"""Helpers and fixtures for adapter tests: a tiny random Llama and real PEFT LoRA folders made from it.

Not a conftest.py on purpose: tests elsewhere do `from conftest import ...`, and a second
conftest module would shadow the root one. Test modules import the fixtures they use from here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BASE_NAME = "tiny/llama-64"
VOCAB = 128


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k/v out = 32: non-square modules
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_lora(
    out: Path,
    seed: int,
    *,
    r: int = 4,
    alpha: float = 8,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    base_name: str | None = BASE_NAME,
    hidden: int = 64,
    shared_A: dict | None = None,
    std: float = 0.2,
) -> Path:
    """Save a real PEFT LoRA folder with random A and B (B non-zero so the update is non-trivial).
    `shared_A`: module -> tensor used as lora_A (to build tasks that truly share A)."""
    model = tiny_llama(0, hidden)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if shared_A is not None:
            for name, mod in pm.named_modules():
                key = name.removeprefix("base_model.model.")
                if key in shared_A and hasattr(mod, "lora_A"):
                    mod.lora_A["default"].weight.copy_(shared_A[key])
    pm.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    d = json.loads(cfg_path.read_text())
    d["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(d, indent=2))
    return out


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def lib4(tmp_path_factory) -> list[Path]:
    """Four rank-4 adapters on q/k/v/o (same rank, no rsLoRA): the parity library."""
    root = tmp_path_factory.mktemp("lib4")
    return [make_lora(root / f"task{i}", seed=100 + i, alpha=4 + 2 * i) for i in range(4)]


@pytest.fixture(scope="session")
def lib_mixed(tmp_path_factory) -> list[Path]:
    """Three adapters with different ranks, alphas, rsLoRA and a rank_pattern."""
    root = tmp_path_factory.mktemp("libmixed")
    return [
        make_lora(root / "a", seed=1, r=4, alpha=8),
        make_lora(root / "b", seed=2, r=8, alpha=4, use_rslora=True),
        make_lora(root / "c", seed=3, r=6, alpha=12, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    ]


@pytest.fixture
def tok_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def lib_qv(tmp_path_factory) -> list[Path]:
    """Three rank-4 adapters on q/v only: here the bank's natural module order equals the model's
    module order, so DARE's random draws can be replayed against PEFT."""
    root = tmp_path_factory.mktemp("libqv")
    return [make_lora(root / f"qv{i}", seed=200 + i, alpha=4 + 2 * i, targets=("q_proj", "v_proj")) for i in range(3)]
