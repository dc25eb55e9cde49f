"""romscale: trade flash storage ("ROM") for on-device LLM quality.

Two halves: MeKi memory experts (`romscale.meki`, deployed through `romscale.rom`) and adapter
libraries under a storage budget (`romscale.adapters`). The public API, in one place:

    import romscale as rs

    model, tok = rs.load_causal_lm("models/smollm2-135m")     # HF folder (safetensors) or .gguf
    rs.attach_meki(model, rs.MekiConfig(d_mem=64))            # logits unchanged until trained
    ...                                                       # train as usual
    rs.fold(model)                                            # one token-indexed table per layer
    rs.export_bundle(model, "bundle/", dtype="fp16", tokenizer=tok)
    rs.verify_bundle("bundle/")                               # every block checksum
    bundle = rs.load_bundle("bundle/")                        # tables stay on storage (mmap)
    bank = rs.AdapterBank.load(["a/", "b/", "c/"])            # PEFT LoRA adapters
    rs.write_peft_adapter(rs.merge_adapters(bank, "ties").adapter, "merged/")

Names are imported on first use (PEP 562), so `import romscale` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from romscale.errors import RomscaleError

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time these resolve through __getattr__
    from romscale.adapters.bank import AdapterBank
    from romscale.adapters.bundle import HydraBundle
    from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt
    from romscale.adapters.merge import MergeOptions, merge_adapters
    from romscale.adapters.peft_io import read_peft_adapter, write_peft_adapter
    from romscale.meki.attach import attach_meki, detach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.fold import fold
    from romscale.meki.io import load_meki, save_meki
    from romscale.meki.params import parameter_report
    from romscale.models import load_causal_lm
    from romscale.rom.runtime import export_bundle, load_bundle, verify_bundle

_EXPORTS: dict[str, str] = {
    "MekiConfig": "romscale.meki.config",
    "attach_meki": "romscale.meki.attach",
    "detach_meki": "romscale.meki.attach",
    "fold": "romscale.meki.fold",
    "save_meki": "romscale.meki.io",
    "load_meki": "romscale.meki.io",
    "parameter_report": "romscale.meki.params",
    "export_bundle": "romscale.rom.runtime",
    "load_bundle": "romscale.rom.runtime",
    "verify_bundle": "romscale.rom.runtime",
    "AdapterBank": "romscale.adapters.bank",
    "merge_adapters": "romscale.adapters.merge",
    "MergeOptions": "romscale.adapters.merge",
    "fit_hydraopt": "romscale.adapters.hydraopt",
    "HydraOptConfig": "romscale.adapters.hydraopt",
    "HydraBundle": "romscale.adapters.bundle",
    "read_peft_adapter": "romscale.adapters.peft_io",
    "write_peft_adapter": "romscale.adapters.peft_io",
    "load_causal_lm": "romscale.models",
}

__all__ = [  # a literal list, so that static analysers read it; equals _EXPORTS + the two above
    "AdapterBank", "HydraBundle", "HydraOptConfig", "MekiConfig", "MergeOptions", "RomscaleError",
    "__version__", "attach_meki", "detach_meki", "export_bundle", "fit_hydraopt", "fold",
    "load_bundle", "load_causal_lm", "load_meki", "merge_adapters", "parameter_report",
    "read_peft_adapter", "save_meki", "verify_bundle", "write_peft_adapter",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'romscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
