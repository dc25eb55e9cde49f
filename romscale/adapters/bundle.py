"""HydraOpt bundle: shared factors + task map, saved as one safetensors file and one JSON file.

    <bundle>/hydraopt.json         format, version, tasks, per-module shapes and task map,
                                   storage accounting, fit report, sha256 of the factors file
    <bundle>/factors.safetensors   "<module>::A" (K_A, rho, d_in) and "<module>::B" (K_B, d_out, rho)

Task t at module m uses A[a_group[t]] and B[b_group[t]] with scaling 1. The reader checks the
checksum, every key, shape, dtype, group index and finiteness before trusting the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from romscale.errors import AdapterError
from romscale.adapters.peft_io import LoraAdapter, adapter_from_factors, check_output_path, natural_key, write_peft_adapter
from romscale.adapters.storage import StorageReport
from romscale.utils.atomic import atomic_dir

FORMAT = "romscale.hydraopt"
VERSION = 1
MANIFEST = "hydraopt.json"
FACTORS = "factors.safetensors"


@dataclass
class ModuleFactors:
    A: torch.Tensor  # (K_A, rho, d_in)
    B: torch.Tensor  # (K_B, d_out, rho)
    a_group: np.ndarray  # (N,) task -> A index
    b_group: np.ndarray  # (N,) task -> B index

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


@dataclass
class HydraBundle:
    tasks: list[str]
    modules: dict[str, ModuleFactors]
    template_config: dict[str, Any]
    library_params: int
    library_bytes: int
    fit: dict[str, Any]
    source: Path | None = None

    # -- accounting --------------------------------------------------------------------------------
    def storage(self) -> StorageReport:
        return StorageReport.from_tensors((m, t) for m, f in self.modules.items() for t in (f.A, f.B))

    def summary(self) -> dict[str, Any]:
        st = self.storage()
        ka = sorted({int(f.A.shape[0]) for f in self.modules.values()})
        kb = sorted({int(f.B.shape[0]) for f in self.modules.values()})
        return {
            "tasks": self.tasks,
            "k_a": ka,
            "k_b": kb,
            "ranks": sorted({f.rank for f in self.modules.values()}),
            "storage": st.to_dict(per_module=False),
            "library_params": self.library_params,
            "library_bytes": self.library_bytes,
            "storage_fraction_params": st.params / self.library_params,
            "storage_fraction_bytes": st.bytes / self.library_bytes,
            "objective": self.fit.get("objective"),
            "task_errors": self.fit.get("task_errors"),
        }

    # -- materialisation -------------------------------------------------------------------------
    def _task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise AdapterError(f"no task {task!r} in the bundle; tasks are {self.tasks}") from None

    def task_factors(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        t = self._task_index(task)
        return {m: (f.A[int(f.a_group[t])], f.B[int(f.b_group[t])]) for m, f in self.modules.items()}

    def task_adapter(self, task: str) -> LoraAdapter:
        """Task `task` as a standard PEFT LoRA adapter (rank rho, scaling 1)."""
        factors = {m: (A.contiguous(), B.contiguous()) for m, (A, B) in self.task_factors(task).items()}
        return adapter_from_factors(task, self.template_config, factors)

    def export_task(self, task: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        protect = [self.source] if self.source else []
        return write_peft_adapter(self.task_adapter(task), out, overwrite=overwrite, protect=protect)

    def load_into(self, model: torch.nn.Module, task: str, adapter_name: str = "default"):
        """Put task `task` straight from the bundle into a PEFT model (no adapter folder needed).

        `model` is a base transformers model (returns a new PeftModel) or a PeftModel (the adapter is
        added under `adapter_name`)."""
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

        ad = self.task_adapter(task)
        known = set(LoraConfig.__dataclass_fields__)
        cfg = LoraConfig(**{k: v for k, v in ad.config.items() if k in known and k not in ("peft_type", "peft_version")})
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, cfg)
            pm = model
        else:
            pm = get_peft_model(model, cfg, adapter_name=adapter_name)
        res = set_peft_model_state_dict(pm, ad.tensors(), adapter_name=adapter_name)
        missing = [k for k in res.missing_keys if "lora_" in k and f".{adapter_name}." in k]
        if missing or res.unexpected_keys:
            raise AdapterError(f"bundle task {task!r} does not fit the model: missing {missing[:3]}, unexpected {list(res.unexpected_keys)[:3]}")
        pm.set_adapter(adapter_name)
        pm.eval()
        return pm

    # -- files -------------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike, *, overwrite: bool = False, protect: list[Path] | None = None) -> Path:
        out = Path(out)
        check_output_path(out, list(protect or []), overwrite)
        tensors = {}
        for m, f in self.modules.items():
            tensors[f"{m}::A"] = f.A.contiguous()
            tensors[f"{m}::B"] = f.B.contiguous()
        blob = safetensors.torch.save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
        st = self.storage()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tasks": self.tasks,
            "factors_file": FACTORS,
            "factors_sha256": hashlib.sha256(blob).hexdigest(),
            "factors_file_bytes": len(blob),
            "modules": {
                m: {
                    "d_in": int(f.A.shape[2]),
                    "d_out": int(f.B.shape[1]),
                    "rank": f.rank,
                    "k_a": int(f.A.shape[0]),
                    "k_b": int(f.B.shape[0]),
                    "dtype": str(f.A.dtype).removeprefix("torch."),
                    "a_group": [int(x) for x in f.a_group],
                    "b_group": [int(x) for x in f.b_group],
                }
                for m, f in self.modules.items()
            },
            "storage": st.to_dict(),
            "library_params": self.library_params,
            "library_bytes": self.library_bytes,
            "storage_fraction_params": st.params / self.library_params,
            "peft_config_template": self.template_config,
            "fit": self.fit,
        }
        with atomic_dir(out) as tmp:
            (tmp / FACTORS).write_bytes(blob)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HydraBundle":
        path = Path(path)
        mpath, fpath = path / MANIFEST, path / FACTORS
        if not mpath.is_file():
            raise AdapterError(f"{path}: not a HydraOpt bundle (no {MANIFEST})")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{mpath}: is not valid JSON ({exc})") from exc
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise AdapterError(f"{mpath}: format is {man.get('format') if isinstance(man, dict) else None!r}, expected {FORMAT!r}")
        if man.get("version") != VERSION:
            raise AdapterError(f"{mpath}: version {man.get('version')!r} is not supported (expected {VERSION})")
        if not fpath.is_file():
            raise AdapterError(f"{fpath}: missing; the bundle needs its factors file")
        blob = fpath.read_bytes()
        if hashlib.sha256(blob).hexdigest() != man.get("factors_sha256"):
            raise AdapterError(f"{fpath}: sha256 does not match {MANIFEST}; the file is corrupt or was modified")
        try:
            tensors = safetensors.torch.load(blob)
        except Exception as exc:
            raise AdapterError(f"{fpath}: cannot be read as safetensors ({exc})") from exc
        tasks = man.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise AdapterError(f"{mpath}: 'tasks' must be a non-empty list")
        n = len(tasks)
        modules: dict[str, ModuleFactors] = {}
        spec = man.get("modules") or {}
        expected_keys = {f"{m}::{s}" for m in spec for s in ("A", "B")}
        if set(tensors) != expected_keys:
            extra, missing = sorted(set(tensors) - expected_keys)[:3], sorted(expected_keys - set(tensors))[:3]
            raise AdapterError(f"{fpath}: tensors do not match {MANIFEST} (missing {missing}, unexpected {extra})")
        for m in sorted(spec, key=natural_key):
            s = spec[m]
            A, B = tensors[f"{m}::A"], tensors[f"{m}::B"]
            want_a = (s["k_a"], s["rank"], s["d_in"])
            want_b = (s["k_b"], s["d_out"], s["rank"])
            if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
                raise AdapterError(f"{fpath}: module {m} has A {tuple(A.shape)} / B {tuple(B.shape)}, expected {want_a} / {want_b}")
            if str(A.dtype).removeprefix("torch.") != s.get("dtype") or B.dtype != A.dtype:
                raise AdapterError(f"{fpath}: module {m} dtype {A.dtype}/{B.dtype} does not match {MANIFEST} ({s.get('dtype')})")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise AdapterError(f"{fpath}: module {m} has NaN/Inf factors")
            ag, bg = np.asarray(s["a_group"], dtype=np.int64), np.asarray(s["b_group"], dtype=np.int64)
            if ag.shape != (n,) or bg.shape != (n,) or ag.min() < 0 or bg.min() < 0 or ag.max() >= s["k_a"] or bg.max() >= s["k_b"]:
                raise AdapterError(f"{mpath}: module {m} task map is not {n} indices within K_A={s['k_a']}, K_B={s['k_b']}")
            modules[m] = ModuleFactors(A, B, ag, bg)
        return cls(
            tasks=list(tasks),
            modules=modules,
            template_config=man.get("peft_config_template") or {},
            library_params=int(man["library_params"]),
            library_bytes=int(man["library_bytes"]),
            fit=man.get("fit") or {},
            source=path,
        )
