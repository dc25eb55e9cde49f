"""The model a training config describes: a Llama of the configured shape with the corpus tokenizer's
vocabulary, plus its memory (`attach_memory`, through the romscale.memories registry)."""

from __future__ import annotations

import torch
from torch import nn

from romscale.train.config import ModelConfig, TrainConfig


def llama_config(m: ModelConfig, vocab_size: int, max_positions: int, eos_id: int | None = None):
    """The transformers LlamaConfig of `m` (no dropout: the forward is deterministic)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden,
        intermediate_size=m.ffn,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim or m.hidden // m.heads,
        max_position_embeddings=max_positions,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=eos_id,
    )


def meki_config(m: ModelConfig):
    from romscale.meki.config import MekiConfig

    o = m.meki
    return MekiConfig(d_mem=o.d_mem, memory=o.memory, position=o.position, fusion=o.fusion, dynamic_proj=o.dynamic_proj,
                      zero_init_output=o.zero_init_output, init_std=o.init_std, layers=o.layers)


def memory_config(m: ModelConfig, hf_config):
    """The memory config `m` asks for (None for a dense model): MeKi from its typed section, the
    others from memory_options; with rom_params, resized to that ROM budget."""
    if m.memory == "none":
        return None
    from romscale.memories.base import get_memory
    from romscale.utils.config import ConfigError

    mem = get_memory(m.memory)
    if m.memory == "meki":
        if m.memory_options:
            raise ConfigError("model.memory_options: MeKi takes its options from model.meki")
        base = meki_config(m)
    else:
        try:
            base = mem.config_cls.from_dict(dict(m.memory_options))
        except Exception as exc:  # the memory's own validation: unknown or out-of-range fields
            raise ConfigError(f"model.memory_options ({m.memory}): {exc}") from None
    return mem.size_for_budget(m.rom_params, hf_config, base) if m.rom_params else base


def attach_memory(model: nn.Module, m: ModelConfig) -> nn.Module:
    """The one place a memory joins a model (the romscale.memories registry)."""
    cfg = memory_config(m, model.config)
    if cfg is not None:
        from romscale.memories.base import get_memory

        get_memory(m.memory).attach(model, cfg)
    return model


def pretrained(name_or_path: str, vocab_size: int) -> nn.Module:
    """The float32 weights of a pretrained causal LM (romscale.models: packaged name, HF folder or
    GGUF), checked against the corpus's vocabulary."""
    from romscale.models import load_base_model
    from romscale.utils.config import ConfigError

    model, _ = load_base_model(name_or_path, dtype="float32", option="model.init_from")
    n = model.get_input_embeddings().weight.shape[0]
    if vocab_size != n:
        raise ConfigError(f"model.init_from {name_or_path}: its vocabulary has {n:,} tokens but the corpus uses {vocab_size:,}; "
                          "tokenise the corpus with this model's tokenizer (romscale data corpus --tokenizer smollm2)")
    return model


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised model for `cfg` (seeded by cfg.seed), with its memory attached.

    `vocab_size` / `eos_id` come from the corpus (romscale.data.corpus.Corpus)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.model.init_from:
        model = pretrained(cfg.model.init_from, vocab_size).to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(llama_config(cfg.model, vocab_size, cfg.data.seq_len, eos_id), dtype=torch.float32)
    attach_memory(model, cfg.model)
    return model


def table_parameters(model: nn.Module) -> set[int]:
    """ids of token-indexed tables: every nn.Embedding weight (input embedding, MeKi static tables,
    and the output projection when it is tied to the embedding)."""
    return {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float, decay_tables: bool) -> list[dict]:
    """AdamW groups by the nanoGPT rule: decay every parameter with 2+ dimensions (matrices and
    tables); never biases, norm gains or scalars (MeKi's alpha / beta). With decay_tables=False the
    token-indexed tables are exempt too (their rows get gradient only when their token occurs, so
    decoupled decay shrinks rare rows on every step)."""
    tables = table_parameters(model) if not decay_tables else set()
    decay, no_decay = [], []
    for p in model.parameters():  # model.parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in tables else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
