"""Exact storage accounting: parameters and bytes, by dtype, per module and in total.

Bytes are tensor payload bytes (numel * element size), i.e. what must be stored whatever the
container; file sizes (headers, JSON) are reported separately by the callers that write files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Tally:
    params: int = 0
    bytes: int = 0
    by_dtype: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, numel: int, dtype: torch.dtype) -> None:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.params += numel
        self.bytes += nbytes
        d = self.by_dtype.setdefault(dtype_name(dtype), {"params": 0, "bytes": 0})
        d["params"] += numel
        d["bytes"] += nbytes

    def to_dict(self) -> dict:
        return {"params": self.params, "bytes": self.bytes, "by_dtype": {k: dict(v) for k, v in sorted(self.by_dtype.items())}}


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

    @classmethod
    def combine(cls, reports: Iterable["StorageReport"]) -> "StorageReport":
        total, per = Tally(), {}
        for rep in reports:
            for mod, tally in rep.per_module.items():
                for dt, v in tally.by_dtype.items():
                    dtype = getattr(torch, dt)
                    per.setdefault(mod, Tally()).add(v["params"], dtype)
                    total.add(v["params"], dtype)
        return cls(total, per)

    def to_dict(self, per_module: bool = True) -> dict:
        out = self.total.to_dict()
        if per_module:
            out["per_module"] = {m: t.to_dict() for m, t in self.per_module.items()}
        return out
