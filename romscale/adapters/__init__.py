"""Adapter libraries under a storage budget: PEFT I/O, merges, HydraOpt.

    bank = AdapterBank.load(["a/", "b/", "c/"])               # checked to fit together
    merged = merge_adapters(bank, "ties", MergeOptions(density=0.5))   # in the inputs' dtype
    write_peft_adapter(merged.adapter, "merged/", inputs=bank.sources)  # loads with PeftModel.from_pretrained
    bundle = fit_hydraopt(bank, HydraOptConfig(storage=0.5))   # half the library's bytes
    bundle.save("lib.hydra/"); bundle.export_task("a", "a_small/"); bundle.export_all("tasks/")

Names are imported lazily so that `romscale --help` does not pay for importing peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterBank": "bank",
    "HydraBundle": "bundle",
    "HydraOptConfig": "hydraopt",
    "fit_hydraopt": "hydraopt",
    "fit_hydraopt_many": "hydraopt",
    "storage_params": "hydraopt",
    "CLUSTERERS": "clusterers",
    "ClusterProblem": "clusterers",
    "get_clusterer": "clusterers",
    "D2CConfig": "d2c",
    "run_d2c": "d2c",
    "MERGE_METHODS": "merge",
    "MergeMethod": "merge",
    "MergeOptions": "merge",
    "get_merge_method": "merge",
    "merge_adapters": "merge",
    "register_merge_method": "merge",
    "LoraAdapter": "peft_io",
    "LoraModule": "peft_io",
    "read_peft_adapter": "peft_io",
    "write_peft_adapter": "peft_io",
    "reconstruction_report": "report",
    "StorageReport": "storage",
    "collect_input_factors": "activations",
    "model_order": "order",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"romscale.adapters.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'romscale.adapters' has no attribute {name!r}")
