"""Shared fixtures: tiny random models of every supported family (no hub, no network)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 96
FAMILY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_base(family: str = "llama", seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    cfg = FAMILY_CONFIGS[family](
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def randomize_meki(model, std: float = 0.5, seed: int = 1) -> None:
    """Give every MeKi parameter a non-trivial value so the branch visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".meki." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() <= 1 else 0.0))


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
