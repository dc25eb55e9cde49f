"""Exact storage accounting: parameters and bytes, by dtype, per module and in total.

Storage is stated in both units everywhere: parameters, and bytes with their dtype. Bytes are
tensor payload bytes (numel * element size), i.e. what must be stored whatever the
container; file sizes (headers, JSON) are reported separately by the callers that write files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from romscale.errors import RomscaleError

DTYPES = ("float32", "float16", "bfloat16")  # dtypes an output may be written in


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise RomscaleError(f"{what} must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def common_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype outputs default to: the inputs' dtype, or float32 where the inputs mix dtypes
    (float16 and bfloat16 cannot hold each other's values)."""
    found = set(dtypes)
    if len(found) == 1:
        (only,) = found
        if only in (torch.float32, torch.float16, torch.bfloat16):
            return only
    return torch.float32


@dataclass
class Tally:
    params: int = 0
    bytes: int = 0
    by_dtype: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, numel: int, dtype: torch.dtype) -> None:
        nbytes = numel * itemsize(dtype)
        self.params += numel
        self.bytes += nbytes
        d = self.by_dtype.setdefault(dtype_name(dtype), {"params": 0, "bytes": 0})
        d["params"] += numel
        d["bytes"] += nbytes

    @property
    def dtype(self) -> str:
        """The one dtype of everything counted, or "mixed" (reports state bytes with their dtype)."""
        return next(iter(self.by_dtype)) if len(self.by_dtype) == 1 else "mixed"

    def to_dict(self) -> dict:
        return {"params": self.params, "bytes": self.bytes, "dtype": self.dtype, "by_dtype": {k: dict(v) for k, v in sorted(self.by_dtype.items())}}


@dataclass
class StorageReport:
    """Totals plus a per-module breakdown. Build it with `from_tensors`."""

    total: Tally
    per_module: dict[str, Tally]

    @property
    def params(self) -> int:
        return self.total.params

    @property
    def bytes(self) -> int:
        return self.total.bytes

    @classmethod
    def from_tensors(cls, items: Iterable[tuple[str, torch.Tensor]]) -> "StorageReport":
        """`items`: (module name, tensor) pairs; a module may appear several times."""
        total, per = Tally(), {}
        for module, t in items:
            total.add(t.numel(), t.dtype)
            per.setdefault(module, Tally()).add(t.numel(), t.dtype)
        return cls(total, per)

    def to_dict(self, per_module: bool = True) -> dict:
        out = self.total.to_dict()
        if per_module:
            out["per_module"] = {m: t.to_dict() for m, t in self.per_module.items()}
        return out
