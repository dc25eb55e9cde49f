"""The trainer's typed configuration: nested dataclasses <-> YAML (pyyaml `safe_load`).

Every field carries its help text (`metadata["help"]`) and its range (`ge` / `gt` / `le` / `lt`);
`Literal` types are the allowed choices. Reading is strict: an unknown key, a wrong type or a value
out of range raises ConfigError naming the file and the key path (`optim.lr`). The reference in
docs/training.md is generated from these fields (`config_reference()`), so it cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from romscale.utils.config import ConfigError, build, read_yaml, reference, to_plain
from romscale.utils.config import reference_markdown as _reference_markdown

Precision = Literal["auto", "bf16", "fp32"]
MemoryKind = Literal["none", "meki", "ple", "engram", "fat"]
MekiMemory = Literal["static+dynamic", "static", "dynamic"]
MekiPosition = Literal["parallel_ffn", "parallel_attn", "after_attn", "after_ffn"]
MekiFusion = Literal["add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu"]
MekiDynamicProj = Literal["swiglu", "linear"]


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field with help text and optional range limits (ge, gt, le, lt)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not used in configs")
    return field(default=default, metadata={"help": help, **limits})


def _nested(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class MekiOptions:
    """The MeKi memory attached when model.memory is "meki" (romscale.meki.config.MekiConfig)."""

    d_mem: int = _f(16, "memory width per layer (the paper uses d/8)", ge=1)
    memory: MekiMemory = _f("static+dynamic", "which terms the memory has: the static token table, the dynamic projection, or both")
    position: MekiPosition = _f("parallel_ffn", "where the branch joins the decoder layer")
    fusion: MekiFusion = _f("add_sigmoid", "how the gate combines with the memory vector")
    dynamic_proj: MekiDynamicProj = _f("swiglu", "the dynamic projection G: the paper's SwiGLU or a plain linear map")
    zero_init_output: bool = _f(False, "start the branch output at exactly zero (retrofits); from scratch, false")
    init_std: float = _f(0.02, "standard deviation of the memory's initial weights", gt=0)
    layers: tuple[int, ...] | None = _f(None, "decoder layer indices that get memory; null means every layer")


@dataclass
class ModelConfig:
    """A Llama of this shape (transformers LlamaForCausalLM); the vocabulary is the corpus tokenizer's."""

    layers: int = _f(4, "number of decoder layers", ge=1)
    hidden: int = _f(256, "model width d", ge=1)
    ffn: int = _f(688, "SwiGLU feed-forward width", ge=1)
    heads: int = _f(4, "attention heads", ge=1)
    kv_heads: int = _f(2, "key/value heads (grouped-query attention); must divide heads", ge=1)
    head_dim: int | None = _f(None, "width of one head; null means hidden / heads", ge=1)
    tie_embeddings: bool = _f(True, "share the input embedding with the output projection")
    rope_theta: float = _f(10000.0, "RoPE base frequency", gt=0)
    init_std: float = _f(0.02, "standard deviation of the initial weights (transformers initializer_range)", gt=0)
    init_from: str | None = _f(None, "continue training a pretrained causal LM instead of a fresh one (the retrofit): a packaged name "
                               "(smollm2-135m-instruct), a local HF folder or a GGUF file; its shape replaces the fields above and the "
                               "corpus must be tokenised with its tokenizer (romscale data corpus --tokenizer smollm2)")
    memory: MemoryKind = _f("none", "memory attached to the model: none (dense), meki, ple, engram, or fat (the fat-embedding control); docs/memories.md")
    meki: MekiOptions = _nested(MekiOptions, "MeKi options, used when memory is meki")
    memory_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "fields of the memory's config when memory is ple, engram or fat (PleConfig, EngramConfig, FatConfig in docs/memories.md); unknown fields are errors"})
    rom_params: int | None = _f(None, "size the memory to this ROM budget in parameters (its width chosen by romscale.memories.budget): matched arms", ge=1)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into sequences."""

    corpus: str = _f("", "corpus folder written by `romscale data corpus` (relative paths: from the current folder)")
    seq_len: int = _f(128, "tokens per training sequence (the corpus is cut into non-overlapping blocks of this length)", ge=2)
    batch_size: int = _f(16, "sequences per forward pass on each process (the micro-batch)", ge=1)
    grad_accum: int = _f(1, "micro-batches accumulated per optimiser step; global batch = batch_size x grad_accum x processes", ge=1)
    val_blocks: int = _f(64, "validation sequences: the first ones of the corpus's val split, always the same (rounded down to a multiple of the process count)", ge=1)
    val_batch_size: int = _f(16, "sequences per forward pass during validation", ge=1)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to a floor."""

    lr: float = _f(1e-3, "peak learning rate, reached at the end of warm-up", gt=0)
    min_lr_ratio: float = _f(0.1, "the floor: the cosine ends at lr x min_lr_ratio at the last step", ge=0, le=1)
    warmup_steps: int = _f(100, "linear warm-up steps: step s < warmup_steps uses lr x (s + 1) / warmup_steps", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = _f(0.1, "decoupled weight decay on 2-D+ weights (nanoGPT rule: not on biases, norms, scalars)", ge=0)
    decay_tables: bool = _f(True, "also decay token-indexed tables (input embedding, MeKi static tables); false exempts them")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping", ge=0)


@dataclass
class TrainConfig:
    """One training run: model, data, optimiser and schedule of the loop."""

    seed: int = _f(0, "seed of the model initialisation, the data order and every RNG", ge=0)
    steps: int = _f(1000, "optimiser steps", ge=1)
    precision: Precision = _f("auto", "auto: bf16 autocast on a GPU and on a CPU with native bf16 (AVX512-BF16 / AMX), else fp32; bf16: bf16 autocast; fp32: none")
    log_every: int = _f(10, "write a metrics row every this many steps (and at the last step)", ge=1)
    eval_every: int = _f(100, "validate every this many steps (and at the last step)", ge=1)
    save_every: int = _f(100, "write the checkpoint every this many steps (and at the last step)", ge=1)
    progress: bool = _f(True, "show a progress bar (only when stderr is a terminal)")
    out: str | None = _f(None, "run folder; --out overrides it")
    model: ModelConfig = _nested(ModelConfig, "the model")
    data: DataConfig = _nested(DataConfig, "the data")
    optim: OptimConfig = _nested(OptimConfig, "the optimiser and the learning-rate schedule")

    def global_batch(self, processes: int = 1) -> int:
        """Sequences per optimiser step over all processes."""
        return self.data.batch_size * self.data.grad_accum * processes

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- reading and checking (romscale.utils.config: the one strict reader) ----------------------------
def _check(cfg: TrainConfig, where: str) -> None:
    """Checks that span several fields."""
    m = cfg.model
    if m.heads % m.kv_heads:
        raise ConfigError(f"{where}: model.kv_heads ({m.kv_heads}) must divide model.heads ({m.heads})")
    if m.head_dim is None and m.hidden % m.heads:
        raise ConfigError(f"{where}: model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads}), or set model.head_dim")
    if m.meki.layers is not None:
        bad = [i for i in m.meki.layers if not 0 <= i < m.layers]
        if bad:
            raise ConfigError(f"{where}: model.meki.layers has {bad}, outside the model's layers 0..{m.layers - 1}")
    if cfg.optim.warmup_steps > cfg.steps:
        raise ConfigError(f"{where}: optim.warmup_steps ({cfg.optim.warmup_steps}) is more than steps ({cfg.steps})")


def config_from_dict(data: Any, where: str = "config") -> TrainConfig:
    """A validated TrainConfig from a plain dict (as YAML gives); `where` names the source in errors."""
    cfg = build(TrainConfig, data, where, hint="docs/training.md")
    _check(cfg, where)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config (yaml.safe_load), strictly."""
    return config_from_dict(read_yaml(path, "training config"), str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml(), encoding="utf-8")


def config_reference(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every field, depth first: the docs' reference table."""
    return reference(cls, prefix)


def reference_markdown() -> str:
    """The config reference as a Markdown table."""
    return _reference_markdown(TrainConfig)
