"""The memory protocol shared by MeKi, PLE, Engram and the fat-embedding control.

Modelled on PEFT's tuners (src/peft/tuners/tuners_utils.py): each memory is a config dataclass, its
modules and an injection; the machinery they share lives here once:

- `Family`: where the decoder layers, the decoder stack and each layer's attention / MLP live in one
  Hugging Face architecture (Llama layout: llama, qwen2, qwen3, mistral).
- `IdRecorder`: ONE forward pre-hook on the decoder stack per model, whatever memories are attached.
  It records the input ids of every call (full forward, prefill, each KV-cached decode step) and keeps
  the last `keep` ids per batch row across decode steps, so a memory addressed by n-grams (Engram)
  sees the same n-grams with and without a KV cache. Padding positions (attention_mask 0, e.g. left
  padding) are replaced by PAD_ID, the same value a sequence start has, so a left-padded row sees
  exactly what the unpadded row sees.
- `Memory`: the protocol (attach / detach / rom_params / fold / export_rows / state_dict), and the
  registry MEMORIES with `get_memory(name)`.

A memory's config rides in the HF config under its own name (config.json["meki"], ["ple"], ...): that
is how a model's attached memories are found and how checkpoints key their sections.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from romscale.errors import RomscaleError, UnsupportedModelError

PAD_ID = -1  # what the recorder stores for padding and for "before the sequence start"


# ---- architectures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where the pieces a memory hooks into live in one architecture."""

    layers: str = "model.layers"  # the ModuleList of decoder layers, from the *ForCausalLM root
    decoder: str = "model"  # the module whose forward receives input_ids
    attn: str = "self_attn"
    mlp: str = "mlp"


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "mistral": Family(),
}


def get_path(root: nn.Module, path: str) -> Any:
    """root.a.b.c for path "a.b.c"."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model: nn.Module, what: str = "this memory") -> Family:
    """The model's Family, or an UnsupportedModelError naming the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{what} does not support model_type {model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(sorted(FAMILIES))}. See romscale/memories/base.py on adding a family."
        )
    fam = FAMILIES[model_type]
    try:
        get_path(model, fam.layers)
        get_path(model, fam.decoder)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{type(model).__name__} does not have the expected layout ({fam}): {exc}") from exc
    return fam


def decoder_layers(model: nn.Module, fam: Family | None = None) -> nn.ModuleList:
    return get_path(model, (fam or family_of(model)).layers)


def layer_indices(layers: tuple[int, ...] | None, num_layers: int, owner: str) -> list[int]:
    """The selected layer indices (None = all), checked against the model's depth."""
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise RomscaleError(f"{owner}.layers has indices {bad} outside the model's 0..{num_layers - 1}")
    return sorted(set(layers))


# ---- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    """Base of every memory's config: JSON round-trippable, unknown keys are errors.

    layers: indices of the decoder layers that get the memory; None means all (where it applies).
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def layer_indices(self, num_layers: int) -> list[int]:
        return layer_indices(self.layers, num_layers, type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RomscaleError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def _check_positive(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise RomscaleError(f"{type(self).__name__}.{name} must be a positive integer, got {v!r}")


# ---- the id-recording hook engine -----------------------------------------------------------------


@dataclass
class IdRecorder:
    """Token ids of the current forward call, shared by every memory attached to one model.

    After the decoder pre-hook ran, for the current call of shape (B, T):
      ids      (B, T) the input ids as given
      valid    (B, T) bool: False at padding positions (attention_mask 0)
      past_len tokens already in the KV cache (0: a new sequence)
      context  (B, keep + T): the `keep` ids before this call per row, then this call's ids, with
               PAD_ID at padding and before the sequence start. Kept across KV-cached decode steps.
    Listeners (one per memory) run after the ids are recorded, e.g. to fetch ROM rows.
    """

    vocab_size: int
    keep: dict[str, int] = field(default_factory=dict)  # per consumer: how many past ids it needs
    listeners: dict[str, Callable[[IdRecorder], None]] = field(default_factory=dict)
    handle: RemovableHandle | None = None
    ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    context: torch.Tensor | None = None
    past_len: int = 0
    seen: int = 0  # tokens recorded since the sequence started (what the KV cache should hold)
    _history: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return max(self.keep.values(), default=0)

    @property
    def fresh(self) -> bool:
        """True when this call starts a new sequence (no KV cache before it)."""
        return self.past_len == 0

    def masked_ids(self) -> torch.Tensor:
        """This call's ids with PAD_ID at padding positions."""
        return self.context[:, self.window :]

    def record(self, ids: torch.Tensor | None, attention_mask: Any, cache: Any) -> None:
        if ids is None:
            raise RomscaleError(
                f"a model with {' + '.join(sorted(self.keep))} memory needs token ids on every call: pass input_ids, "
                "not inputs_embeds (the memory rows are addressed by token id)"
            )
        if ids.dim() != 2:
            raise RomscaleError(f"input_ids must have shape (batch, tokens); got {tuple(ids.shape)}")
        vocab = self.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)].flatten()[0].item()
            raise RomscaleError(f"token id {bad} is out of range for this model's vocabulary of {vocab} (tokenizer and model do not match?)")
        b, t = ids.shape
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())  # read before this call's keys are appended
        else:
            past = mask.shape[1] - t if mask is not None and mask.shape[1] > t else 0
        # The mask's last t columns are this call's tokens (it may or may not cover the cache too).
        valid = mask[:, -t:].bool() if mask is not None and mask.shape[1] >= t else torch.ones_like(ids, dtype=torch.bool)
        w = self.window
        if past == 0:
            history = ids.new_full((b, w), PAD_ID)
            self.seen = 0
        else:
            history = self._history
            # Only a consumer with history (Engram) depends on following the sequence exactly.
            if w and (history is None or history.shape[0] != b or self.seen != past):
                raise RomscaleError(
                    f"this call continues a KV cache of {past} tokens, but the memory recorded {self.seen} tokens "
                    f"for {None if history is None else history.shape[0]} rows (batch {b}): a cache from another "
                    "sequence, a cropped cache or reordered beams cannot be followed; re-run the whole sequence"
                )
            if history is None or history.shape[0] != b:
                history = ids.new_full((b, w), PAD_ID)
        cur = ids.masked_fill(~valid, PAD_ID)
        context = torch.cat([history.to(ids.device), cur], dim=1)
        self.ids, self.valid, self.context, self.past_len = ids, valid, context, past
        self._history = context[:, context.shape[1] - w :] if w else context[:, :0]
        self.seen = past + t
        for listener in list(self.listeners.values()):
            listener(self)


RECORDER_ATTR = "_romscale_ids"


def id_recorder(model: nn.Module) -> IdRecorder | None:
    return getattr(model, RECORDER_ATTR, None)


def join_recorder(
    model: nn.Module, consumer: str, keep: int = 0, listener: Callable[[IdRecorder], None] | None = None
) -> IdRecorder:
    """The model's IdRecorder (installed on first use), with `consumer` registered on it."""
    rec = id_recorder(model)
    if rec is None:
        fam = family_of(model)
        rec = IdRecorder(vocab_size=model.get_input_embeddings().num_embeddings)

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            rec.record(ids, mask, cache)

        rec.handle = get_path(model, fam.decoder).register_forward_pre_hook(pre_hook, with_kwargs=True)
        # nn.Module keeps plain objects in __dict__, outside the state dict.
        object.__setattr__(model, RECORDER_ATTR, rec)
    rec.keep[consumer] = keep
    if listener is not None:
        rec.listeners[consumer] = listener
    return rec


def leave_recorder(model: nn.Module, consumer: str) -> None:
    """Unregister `consumer`; the hook goes when the last consumer leaves."""
    rec = id_recorder(model)
    if rec is None:
        return
    rec.keep.pop(consumer, None)
    rec.listeners.pop(consumer, None)
    if not rec.keep:
        rec.handle.remove()
        delattr(model, RECORDER_ATTR)


# ---- the protocol ---------------------------------------------------------------------------------


@dataclass
class RowExport:
    """A memory's storage-resident rows, ready for a ROM table (romscale.rom.table packs them
    row-major: row r of every layer is one contiguous read).

    tables: one (rows, width) tensor per memory layer; layers: their decoder-layer indices;
    address: what indexes the rows: "token" (token id) or "ngram-hash" (Engram's hashed n-gram ids,
    known once the previous tokens are).
    """

    memory: str
    tables: list[torch.Tensor]
    layers: list[int]
    address: str
    config: dict[str, Any]

    @property
    def num_rows(self) -> int:
        return int(self.tables[0].shape[0])


class Memory(ABC):
    """One storage-based memory. Instances are stateless; the state lives on the model."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MemoryConfig]]
    foldable: ClassVar[bool] = False
    address: ClassVar[str] = "token"
    label: ClassVar[str] = ""  # how messages name it ("PLE", "the fat embedding")
    state_attr: ClassVar[str] = ""  # the model attribute holding its attach state (hooks, tables)

    def state(self, model: nn.Module) -> Any:
        """The attach state this memory keeps on `model`, or None when it is not attached."""
        return getattr(model, self.state_attr, None)

    def check_attach(self, model: nn.Module, cfg: MemoryConfig) -> None:
        """What every attach checks first: a config of this memory, not attached yet."""
        if not isinstance(cfg, self.config_cls):
            raise RomscaleError(f"{self.label} needs a {self.config_cls.__name__}, got {type(cfg).__name__}")
        if self.state(model) is not None:
            raise RomscaleError(f"this model already has {self.label} attached")

    # -- lifecycle
    @abstractmethod
    def attach(self, model: nn.Module, cfg: MemoryConfig, *, folded: bool = False, external: bool = False) -> nn.Module:
        """Add the memory to a HF *ForCausalLM model in place (training form unless `folded`;
        `external`: tables live on storage and rows come from a ROM table). Returns the model."""

    @abstractmethod
    def detach(self, model: nn.Module) -> nn.Module:
        """Remove the memory (modules, hooks, config section)."""

    def is_attached(self, model: nn.Module) -> bool:
        return isinstance(getattr(getattr(model, "config", None), self.name, None), dict)

    def config_of(self, model: nn.Module) -> MemoryConfig:
        section = dict(getattr(model.config, self.name))
        for k in ("folded", "tables"):
            section.pop(k, None)
        return self.config_cls.from_dict(section)

    def is_folded(self, model: nn.Module) -> bool:
        return bool(getattr(model.config, self.name, {}).get("folded", False))

    # -- accounting
    @abstractmethod
    def rom_params(self, cfg: MemoryConfig, model_config: Any) -> int:
        """Parameters that live in storage at inference (what the ROM budget counts)."""

    def ram_params(self, model: nn.Module) -> int:
        """Parameters this memory adds to RAM at inference (projections, gates, norms)."""
        rom_names = set(self.rom_param_names(model))
        return sum(p.numel() for n, p in self.state_dict(model).items() if n not in rom_names)

    def rom_param_names(self, model: nn.Module) -> list[str]:
        """State-dict keys of the tables that go to storage."""
        return []

    @abstractmethod
    def size_for_budget(self, rom_params: int, model_config: Any, base: MemoryConfig | None = None) -> MemoryConfig:
        """The config (from `base`, default config otherwise) whose rom_params is closest to the budget."""

    # -- deployment
    def fold(self, model: nn.Module) -> nn.Module:
        """Precompute what the deployed form reads (MeKi only); others raise."""
        raise RomscaleError(f"{self.name} has no fold: its tables are already what inference reads")

    @abstractmethod
    def export_rows(self, model: nn.Module) -> RowExport:
        """The rows that go to storage, addressed by `self.address` ids."""

    @abstractmethod
    def row_layout(self, model: nn.Module) -> tuple[int, int, list[int]]:
        """(rows, width, layer indices) of the storage table of the attached memory (any form)."""

    @abstractmethod
    def set_row_source(self, model: nn.Module, source: Callable[[torch.Tensor], Any] | None) -> None:
        """Connect (or, with None, disconnect) a ROM table: source(row ids) -> ids.shape +
        (layers, width) rows (or a Future of them), called once per forward as soon as the ids are
        known. The model must have been attached with external=True."""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This memory's section of the model's state dict (keys with a path component == name)."""
        return {k: v for k, v in model.state_dict().items() if self.name in k.split(".")}


MEMORIES: dict[str, Memory] = {}
_BUILTIN = {
    "meki": "romscale.memories.meki",
    "ple": "romscale.memories.ple",
    "engram": "romscale.memories.engram",
    "fat": "romscale.memories.fat",
}


def register_memory(cls: type[Memory]) -> type[Memory]:
    """Class decorator: add one instance of `cls` to MEMORIES under cls.name."""
    if cls.name in MEMORIES and type(MEMORIES[cls.name]) is not cls:
        raise RomscaleError(f"memory {cls.name!r} is registered twice")
    MEMORIES[cls.name] = cls()
    return cls


def load_builtin_memories() -> dict[str, Memory]:
    """Import every built-in memory (registering it); returns MEMORIES."""
    for module in _BUILTIN.values():
        importlib.import_module(module)
    return MEMORIES


def memory_names() -> list[str]:
    return sorted(load_builtin_memories())


def get_memory(name: str) -> Memory:
    """The memory called `name`: meki, ple, engram or fat."""
    load_builtin_memories()
    if name not in MEMORIES:
        raise RomscaleError(f"unknown memory {name!r}; choose one of {', '.join(sorted(MEMORIES))}")
    return MEMORIES[name]


def attached_memories(model: nn.Module) -> list[Memory]:
    """The memories attached to `model`, in registry order."""
    return [m for n, m in sorted(load_builtin_memories().items()) if m.is_attached(model)]


def memory_state_dicts(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{memory type: its section of the state dict} for every attached memory."""
    return {m.name: m.state_dict(model) for m in attached_memories(model)}


def model_dims(model_config: Any) -> tuple[int, int, int]:
    """(vocab, hidden, layers) of a HF config (or a preset-like object with those attributes)."""
    try:
        return int(model_config.vocab_size), int(model_config.hidden_size), int(model_config.num_hidden_layers)
    except AttributeError as exc:
        raise RomscaleError(f"a model config with vocab_size, hidden_size and num_hidden_layers is needed: {exc}") from exc
