"""AdapterBank: N LoRA adapters of one base model, checked to fit together, with exact accounting.

Checks: same base model (by name, unless allowed otherwise, and always by shapes), the same set of
adapted modules, the same layer orientation. Ranks and alphas may differ per adapter and per module
(rank_pattern / alpha_pattern, rsLoRA): each module's scaling is resolved exactly as PEFT does.
Modules are kept in the model's order (see order.py): the order PEFT draws DARE masks in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from romscale.errors import AdapterError
from romscale.adapters.factors import ModuleStack
from romscale.adapters.order import check_order, default_order, natural_key
from romscale.adapters.peft_io import LoraAdapter, read_peft_adapter, write_peft_adapter
from romscale.adapters.storage import StorageReport, common_dtype, dtype_name

# Config keys that describe one adapter, not the injection spec a derived adapter should copy.
_PER_ADAPTER_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_version")


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    # Colliding folder names (runs/a/final, runs/b/final): prefix the parent folder.
    names = [f"{p.parent.name}__{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{n}__{i}" for i, n in enumerate(names)]


class AdapterBank:
    """Validated collection of LoRA adapters. Modules are in the model's order: `module_order`
    (e.g. order.model_order(base_model, ...)) or, by default, transformers' declaration order."""

    def __init__(self, adapters: Sequence[LoraAdapter], *, allow_base_mismatch: bool = False,
                 module_order: Sequence[str] | None = None) -> None:
        if not adapters:
            raise AdapterError("an adapter bank needs at least one adapter")
        names = [a.name for a in adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AdapterError(f"adapter names must be unique; repeated: {dup}")
        self.adapters: list[LoraAdapter] = list(adapters)
        self._storage: StorageReport | None = None
        self._check(allow_base_mismatch)
        ref = self.adapters[0]
        self.modules: list[str] = check_order(module_order, ref.modules) if module_order is not None else default_order(ref.modules)
        self.shapes: dict[str, tuple[int, int]] = {m: (ref.modules[m].d_out, ref.modules[m].d_in) for m in self.modules}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        paths: Sequence[str | os.PathLike],
        names: Sequence[str] | None = None,
        *,
        allow_base_mismatch: bool = False,
        module_order: Sequence[str] | None = None,
        progress: bool = False,
    ) -> "AdapterBank":
        """Load PEFT LoRA folders. `names` default to the folder names (made unique if they collide)."""
        paths = [Path(p) for p in paths]
        if names is not None and len(names) != len(paths):
            raise AdapterError(f"got {len(names)} names for {len(paths)} adapter folders")
        names = list(names) if names is not None else _unique_names(paths)
        adapters = [read_peft_adapter(p, n) for p, n in tqdm(list(zip(paths, names)), desc="load adapters", disable=not progress)]
        return cls(adapters, allow_base_mismatch=allow_base_mismatch, module_order=module_order)

    def _check(self, allow_base_mismatch: bool) -> None:
        ref = self.adapters[0]
        where = lambda a: a.source or a.name  # noqa: E731
        bases = {a.config.get("base_model_name_or_path") for a in self.adapters} - {None, ""}
        if len(bases) > 1 and not allow_base_mismatch:
            by_base = {}
            for a in self.adapters:
                by_base.setdefault(a.config.get("base_model_name_or_path"), where(a))
            detail = "; ".join(f"{b!r} ({p})" for b, p in by_base.items())
            raise AdapterError(
                f"adapters were trained on different base models: {detail}. Pass allow_base_mismatch=True "
                f"(--allow-base-mismatch) only if these names are the same model"
            )
        ref_mods = set(ref.modules)
        for a in self.adapters[1:]:
            mods = set(a.modules)
            if mods != ref_mods:
                missing = sorted(ref_mods - mods, key=natural_key)[:4]
                extra = sorted(mods - ref_mods, key=natural_key)[:4]
                raise AdapterError(
                    f"{where(a)}: adapted modules differ from {where(ref)} (missing {missing}, extra {extra}); "
                    f"all adapters of a bank must adapt the same target modules"
                )
            if bool(a.config.get("fan_in_fan_out", False)) != bool(ref.config.get("fan_in_fan_out", False)):
                raise AdapterError(f"{where(a)}: fan_in_fan_out differs from {where(ref)}")
            for m in ref.modules:
                s_ref = (ref.modules[m].d_out, ref.modules[m].d_in)
                s = (a.modules[m].d_out, a.modules[m].d_in)
                if s != s_ref:
                    raise AdapterError(
                        f"{where(a)}: module {m} is {s[0]}x{s[1]} (d_out x d_in) but {s_ref[0]}x{s_ref[1]} in "
                        f"{where(ref)}; the adapters do not belong to the same base model"
                    )

    # -- views ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def n(self) -> int:
        return len(self.adapters)

    @property
    def sources(self) -> list[Path]:
        return [a.source for a in self.adapters if a.source is not None]

    @property
    def dtype(self) -> torch.dtype:
        """The inputs' dtype (float32 where they mix): what outputs are written in by default."""
        return common_dtype(getattr(torch, name) for name in self.storage().total.by_dtype)

    @property
    def base_model(self) -> str | None:
        return self.adapters[0].config.get("base_model_name_or_path")

    def template_config(self) -> dict[str, Any]:
        """The first adapter's config without its per-adapter rank/alpha fields (for derived adapters)."""
        cfg = dict(self.adapters[0].config)
        for k in _PER_ADAPTER_KEYS:
            cfg.pop(k, None)
        return cfg

    def stack(self, module: str) -> ModuleStack:
        if module not in self.shapes:
            raise AdapterError(f"module {module!r} is not adapted by this bank")
        lm = [a.modules[module] for a in self.adapters]
        return ModuleStack(module, [m.A for m in lm], [m.B for m in lm], [m.scaling for m in lm])

    def ranks(self, module: str) -> list[int]:
        return [a.modules[module].r for a in self.adapters]

    def max_rank(self, module: str) -> int:
        return max(self.ranks(module))

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AdapterError(f"no adapter named {name!r}; have {self.names}") from None

    # -- accounting ----------------------------------------------------------------------------
    def adapter_storage(self, i: int) -> StorageReport:
        a = self.adapters[i]
        return StorageReport.from_tensors((m, t) for m, lm in a.modules.items() for t in (lm.A, lm.B))

    def storage(self) -> StorageReport:
        """Everything the library stores: all factors of all adapters (computed once)."""
        if self._storage is None:
            self._storage = StorageReport.from_tensors(
                (m, t) for a in self.adapters for m, lm in a.modules.items() for t in (lm.A, lm.B)
            )
        return self._storage

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: per adapter and for the library."""
        per = []
        for i, a in enumerate(self.adapters):
            ranks = sorted({lm.r for lm in a.modules.values()})
            scalings = sorted({round(lm.scaling, 6) for lm in a.modules.values()})
            st = self.adapter_storage(i)
            per.append({
                "name": a.name,
                "path": str(a.source) if a.source else None,
                "weights_file": a.weights_file.name if a.weights_file else None,
                "file_bytes": a.weights_file.stat().st_size if a.weights_file and a.weights_file.exists() else None,
                "base_model_name_or_path": a.config.get("base_model_name_or_path"),
                "ranks": ranks,
                "scalings": scalings,
                "use_rslora": bool(a.config.get("use_rslora", False)),
                "modules": len(a.modules),
                "storage": st.to_dict(per_module=False),
            })
        return {
            "n_adapters": self.n,
            "base_model_name_or_path": self.base_model,
            "dtype": dtype_name(self.dtype),
            "module_order": self.modules,
            "modules": {m: {"d_out": s[0], "d_in": s[1], "ranks": self.ranks(m)} for m, s in self.shapes.items()},
            "adapters": per,
            "library_storage": self.storage().to_dict(),
        }

    def write_adapter(self, name: str, out: str | os.PathLike, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write adapter `name` back as a PEFT folder (original config, factors in `dtype` or as loaded);
        every adapter of the bank is an input the output may not touch."""
        a = self.adapters[self.index(name)]
        return write_peft_adapter(a, out, dtype=dtype, overwrite=overwrite, inputs=self.sources)
