"""HydraOpt bundle: shared factors + task map, a romscale output folder of kind "hydraopt-bundle".

    <bundle>/factors.safetensors      "<module>::A" (K_A, rho, d_in) and "<module>::B" (K_B, d_out, rho)
    <bundle>/romscale_manifest.json   kind, the exact file list (bytes, sha256) and, under
                                      "hydraopt": tasks, per-module shapes and task map, storage
                                      (params and bytes), PEFT config template, fit report

Task t at module m uses A[a_group[t]] and B[b_group[t]] with scaling 1. The reader checks the
manifest first (exact file list, sizes, sha256), then every key, shape and dtype of the factors
file against it before allocating, then group indices and finiteness.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import safetensors.torch
import torch

from romscale.adapters.peft_io import LoraAdapter, adapter_from_factors, read_safetensors, safetensors_header, write_adapter_files, write_peft_adapter
from romscale.adapters.storage import StorageReport, dtype_name
from romscale.errors import AdapterError
from romscale.utils.outputs import output_dir, read_manifest

BUNDLE_KIND = "hydraopt-bundle"
SET_KIND = "peft-adapter-set"  # a folder of PEFT adapters, one per task
VERSION = 1  # of the "hydraopt" section
FACTORS = "factors.safetensors"
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def check_task_name(name: Any, where: str) -> str:
    """Task names become folder names on export: plain names only."""
    if not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255 or any(c in name for c in "/\\\x00"):
        raise AdapterError(f"{where}: task name {name!r} is not a plain folder name")
    return name


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
    modules: dict[str, ModuleFactors]  # in the bank's (model) module order
    template_config: dict[str, Any]
    library_params: int
    library_bytes: int
    fit: dict[str, Any]
    library_dtype: str = "float32"
    source: Path | None = None

    # -- accounting --------------------------------------------------------------------------------
    def storage(self) -> StorageReport:
        return StorageReport.from_tensors((m, t) for m, f in self.modules.items() for t in (f.A, f.B))

    def library(self) -> dict[str, Any]:
        return {"params": self.library_params, "bytes": self.library_bytes, "dtype": self.library_dtype}

    def summary(self) -> dict[str, Any]:
        st = self.storage()
        return {
            "tasks": self.tasks,
            "k_a": sorted({int(f.A.shape[0]) for f in self.modules.values()}),
            "k_b": sorted({int(f.B.shape[0]) for f in self.modules.values()}),
            "ranks": sorted({f.rank for f in self.modules.values()}),
            "storage": st.to_dict(per_module=False),
            "library_storage": self.library(),
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
        """Task `task` as a standard PEFT LoRA adapter (rank rho, scaling 1, the factors' dtype)."""
        factors = {m: (A.contiguous(), B.contiguous()) for m, (A, B) in self.task_factors(task).items()}
        return adapter_from_factors(task, self.template_config, factors)

    def _inputs(self, inputs: Iterable[str | os.PathLike]) -> list:
        return [*inputs, *([self.source] if self.source is not None else [])]

    def export_task(self, task: str, out: str | os.PathLike, *, overwrite: bool = False,
                    inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
        """Write one task as a PEFT adapter folder (never over or into the bundle or `inputs`)."""
        return write_peft_adapter(self.task_adapter(task), out, overwrite=overwrite, inputs=self._inputs(inputs), what=what)

    def export_all(self, out: str | os.PathLike, *, overwrite: bool = False,
                   inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
        """Write every task as a PEFT adapter folder `out/<task>/`: one output of kind
        "peft-adapter-set", written (and replaced) as a whole."""
        with output_dir(out, kind=SET_KIND, inputs=self._inputs(inputs), overwrite=overwrite, what=what) as o:
            for task in self.tasks:
                st = write_adapter_files(self.task_adapter(task), o.path / check_task_name(task, "bundle"))
                o.meta.setdefault("adapters", {})[task] = {"storage": st.to_dict(per_module=False)}
        return o.target

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
    def _section(self) -> dict[str, Any]:
        st = self.storage()
        return {
            "version": VERSION,
            "tasks": self.tasks,
            "factors_file": FACTORS,
            "modules": {
                m: {
                    "d_in": int(f.A.shape[2]),
                    "d_out": int(f.B.shape[1]),
                    "rank": f.rank,
                    "k_a": int(f.A.shape[0]),
                    "k_b": int(f.B.shape[0]),
                    "dtype": dtype_name(f.A.dtype),
                    "a_group": [int(x) for x in f.a_group],
                    "b_group": [int(x) for x in f.b_group],
                }
                for m, f in self.modules.items()
            },
            "storage": st.to_dict(),
            "library_storage": self.library(),
            "storage_fraction_params": st.params / self.library_params,
            "storage_fraction_bytes": st.bytes / self.library_bytes,
            "peft_config_template": self.template_config,
            "fit": self.fit,
        }

    def save(self, out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
             what: str = "output") -> Path:
        """Write the bundle folder through output_dir (never over or into `inputs`)."""
        for t in self.tasks:
            check_task_name(t, "bundle")
        tensors = {}
        for m, f in self.modules.items():
            tensors[f"{m}::A"] = f.A.contiguous()
            tensors[f"{m}::B"] = f.B.contiguous()
        with output_dir(out, kind=BUNDLE_KIND, inputs=self._inputs(inputs), overwrite=overwrite, what=what) as o:
            safetensors.torch.save_file(tensors, str(o.path / FACTORS))
            o.meta["hydraopt"] = self._section()
        return o.target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HydraBundle":
        path = Path(path)
        man = read_manifest(path, BUNDLE_KIND, AdapterError)
        where = f"{path}/romscale_manifest.json"
        if set(man["files"]) != {FACTORS}:
            raise AdapterError(f"{where}: lists {sorted(man['files'])}; a HydraOpt bundle holds exactly {FACTORS}")
        h = man.get("hydraopt")
        if not isinstance(h, dict) or h.get("version") != VERSION:
            raise AdapterError(f"{where}: no 'hydraopt' section of version {VERSION}; re-create the bundle with this romscale")
        tasks = h.get("tasks")
        if not isinstance(tasks, list) or not tasks or len(set(map(str, tasks))) != len(tasks):
            raise AdapterError(f"{where}: 'tasks' must be a non-empty list of unique names")
        for t in tasks:
            check_task_name(t, where)
        spec = h.get("modules")
        if not isinstance(spec, dict) or not spec:
            raise AdapterError(f"{where}: 'modules' must describe every module")
        fpath = path / FACTORS
        header, _ = safetensors_header(fpath)
        _check_factor_header(fpath, header, spec, where)
        tensors, _ = read_safetensors(fpath)
        modules = {m: _module_factors(m, spec[m], tensors, len(tasks), fpath, where) for m in spec}
        lib = h.get("library_storage") or {}
        if not all(isinstance(lib.get(k), int) and lib[k] > 0 for k in ("params", "bytes")):
            raise AdapterError(f"{where}: 'library_storage' needs positive integer params and bytes")
        return cls(tasks=list(tasks), modules=modules, template_config=h.get("peft_config_template") or {},
                   library_params=lib["params"], library_bytes=lib["bytes"], fit=h.get("fit") or {},
                   library_dtype=str(lib.get("dtype", "float32")), source=path)


def _shape_spec(m: str, s: Any, where: str) -> dict[str, int]:
    keys = ("d_in", "d_out", "rank", "k_a", "k_b")
    if not isinstance(s, dict) or not all(isinstance(s.get(k), int) and s[k] >= 1 for k in keys) or s.get("dtype") not in _ST_NAMES:
        raise AdapterError(f"{where}: module {m} needs positive integers {', '.join(keys)} and a dtype in {sorted(_ST_NAMES)}")
    return {k: s[k] for k in keys}


def _check_factor_header(fpath: Path, header: dict, spec: dict, where: str) -> None:
    """Every tensor of the factors file has the key, shape and dtype the manifest says, before loading."""
    expected = {}
    for m, s in spec.items():
        d = _shape_spec(m, s, where)
        expected[f"{m}::A"] = ([d["k_a"], d["rank"], d["d_in"]], _ST_NAMES[s["dtype"]])
        expected[f"{m}::B"] = ([d["k_b"], d["d_out"], d["rank"]], _ST_NAMES[s["dtype"]])
    if set(header) != set(expected):
        extra, missing = sorted(set(header) - set(expected))[:3], sorted(set(expected) - set(header))[:3]
        raise AdapterError(f"{fpath}: tensors do not match {where} (missing {missing}, unexpected {extra})")
    for key, (shape, dt) in expected.items():
        if header[key]["shape"] != shape or header[key]["dtype"] != dt:
            raise AdapterError(f"{fpath}: {key} is {header[key]['dtype']} {tuple(header[key]['shape'])}, {where} says {dt} {tuple(shape)}")


def _module_factors(m: str, s: dict, tensors: dict[str, torch.Tensor], n: int, fpath: Path, where: str) -> ModuleFactors:
    A, B = tensors[f"{m}::A"], tensors[f"{m}::B"]
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise AdapterError(f"{fpath}: module {m} has NaN/Inf factors")
    groups = []
    for key, k in (("a_group", s["k_a"]), ("b_group", s["k_b"])):
        g = s.get(key)
        if not isinstance(g, list) or len(g) != n or not all(isinstance(x, int) and 0 <= x < k for x in g):
            raise AdapterError(f"{where}: module {m} task map is not {n} indices within K_A={s['k_a']}, K_B={s['k_b']}")
        groups.append(np.asarray(g, dtype=np.int64))
    return ModuleFactors(A, B, groups[0], groups[1])
