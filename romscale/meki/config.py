"""MeKi configuration: one dataclass, validated, JSON round-trippable (it rides in config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from romscale.errors import RomscaleError
from romscale.memories.base import MemoryConfig

Memory = Literal["static+dynamic", "static", "dynamic"]
Position = Literal["parallel_ffn", "parallel_attn", "after_attn", "after_ffn"]
Fusion = Literal["add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu"]
DynamicProj = Literal["swiglu", "linear"]

MEMORIES: tuple[str, ...] = ("static+dynamic", "static", "dynamic")
POSITIONS: tuple[str, ...] = ("parallel_ffn", "parallel_attn", "after_attn", "after_ffn")
FUSIONS: tuple[str, ...] = ("add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu")
DYNAMIC_PROJS: tuple[str, ...] = ("swiglu", "linear")


@dataclass(frozen=True)
class MekiConfig(MemoryConfig):
    """Shape and variant of the MeKi memory attached to every decoder layer.

    d_mem: memory width (the paper uses d/8 for 0.6B and 1.7B).
    memory / position / fusion: the paper's ablation axes (meki.md, "Variants").
    dynamic_proj: G as the paper's SwiGLU (d -> d/2 -> d_mem) or a plain linear map (its ablation).
    zero_init_output: start the post-RMSNorm weight at zero so the branch outputs exactly 0 and a
        retrofitted model keeps its logits until training moves it.
    layers: indices of the layers that get memory; None means all.
    """

    d_mem: int = 64
    memory: Memory = "static+dynamic"
    position: Position = "parallel_ffn"
    fusion: Fusion = "add_sigmoid"
    dynamic_proj: DynamicProj = "swiglu"
    zero_init_output: bool = True
    init_std: float = 0.02
    rms_eps: float = 1e-6
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.d_mem, int) or self.d_mem <= 0:
            raise RomscaleError(f"MekiConfig.d_mem must be a positive integer, got {self.d_mem!r}")
        for name, allowed in (
            ("memory", MEMORIES),
            ("position", POSITIONS),
            ("fusion", FUSIONS),
            ("dynamic_proj", DYNAMIC_PROJS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise RomscaleError(
                    f"MekiConfig.{name} must be one of {', '.join(allowed)}; got {value!r}"
                )
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def has_static(self) -> bool:
        return self.memory in ("static+dynamic", "static")

    @property
    def has_dynamic(self) -> bool:
        return self.memory in ("static+dynamic", "dynamic")

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise RomscaleError(
                f"MekiConfig.layers has indices {bad} outside the model's 0..{num_layers - 1}"
            )
        return sorted(set(self.layers))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MekiConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RomscaleError(f"unknown MeKi config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
