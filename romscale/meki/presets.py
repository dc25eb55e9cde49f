"""Model presets: a tiny one for tests, a small one for the CPU demo, SmolLM2-135M's shape, and the
paper's three MeKi models (meki.md table: Qwen3-style, GQA, RoPE theta 500000)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from romscale.errors import RomscaleError
from romscale.meki.config import MekiConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Preset:
    family: str  # "llama" or "qwen3"
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    d_mem: int
    rope_theta: float
    tie_embeddings: bool = True
    note: str = ""

    def base_config(self, vocab_size: int | None = None) -> "PretrainedConfig":
        from transformers import LlamaConfig, Qwen3Config  # imported here: `romscale meki info` needs no transformers

        kwargs = dict(
            vocab_size=vocab_size or self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=4096,
        )
        return Qwen3Config(**kwargs) if self.family == "qwen3" else LlamaConfig(**kwargs)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("qwen3", 2, 64, 128, 4, 2, 16, 512, 16, 500000.0, note="unit tests"),
    "demo": Preset("llama", 4, 256, 688, 4, 2, 64, 4096, 32, 10000.0, note="CPU demo on real text"),
    "smollm2-135m": Preset(
        "llama", 30, 576, 1536, 9, 3, 64, 49152, 72, 100000.0, note="SmolLM2-135M shape, d_mem = d/8"
    ),
    "meki-0.6b": Preset("qwen3", 28, 1024, 3072, 16, 8, 128, 151680, 128, 500000.0, note="paper"),
    "meki-1.7b": Preset("qwen3", 28, 2048, 6144, 16, 8, 128, 151680, 256, 500000.0, note="paper"),
    "meki-4b": Preset("qwen3", 36, 2560, 9728, 32, 8, 128, 151680, 512, 500000.0, note="paper"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RomscaleError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(
    preset: str,
    meki: MekiConfig | None = None,
    *,
    with_meki: bool = True,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
):
    """A randomly initialised model of a preset, with MeKi attached unless `with_meki=False`.

    `device="meta"` allocates nothing (parameter counts of paper-size models). `meki` overrides the
    preset's MeKi config (its d_mem defaults to the preset's).
    """
    from transformers import AutoModelForCausalLM

    from romscale.meki.attach import attach_meki

    p = get_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(p.base_config(vocab_size), dtype=dtype)
    if with_meki:
        attach_meki(model, meki or MekiConfig(d_mem=p.d_mem, zero_init_output=False))
    return model
