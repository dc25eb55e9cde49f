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
    tasks = rs.TaskBank.open("bank/", "cpu-16")              # romscale data taskbank
    rs.train_task_adapters(tasks, "smollm2-135m-instruct", "lib/", rs.LoraTrainConfig())
    rs.AdapterBenchmark(rs.AdapterBenchmarkConfig(bank="bank/"), "work/").run()  # score vs storage
    from romscale.train.trainer import train                 # LMs: dense, MeKi, PLE, Engram, fat
    train(rs.TrainConfig(...), "run/")                        # (`romscale.train` is the package)

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
    from romscale.data.taskbank import TaskBank, write_task_bank
    from romscale.adapters.train import LoraTrainConfig, train_task_adapters
    from romscale.adapters.library import load_library
    from romscale.eval.slot import AdapterSlot
    from romscale.eval.generate import TaskEvaluator
    from romscale.adapters.clusterers import ClusterProblem, get_clusterer
    from romscale.adapters.d2c import D2CConfig, run_d2c
    from romscale.bench.adapters import AdapterBenchmark, AdapterBenchmarkConfig
    from romscale.train.config import TrainConfig
    from romscale.memories.base import get_memory
    from romscale.meki.io import load_memories, save_memories
    from romscale.rom.onnx_export import export_native
    from romscale.rom.ort_runtime import OrtDecoder

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
    "TaskBank": "romscale.data.taskbank",
    "write_task_bank": "romscale.data.taskbank",
    "LoraTrainConfig": "romscale.adapters.train",
    "train_task_adapters": "romscale.adapters.train",
    "load_library": "romscale.adapters.library",
    "AdapterSlot": "romscale.eval.slot",
    "TaskEvaluator": "romscale.eval.generate",
    "ClusterProblem": "romscale.adapters.clusterers",
    "get_clusterer": "romscale.adapters.clusterers",
    "D2CConfig": "romscale.adapters.d2c",
    "run_d2c": "romscale.adapters.d2c",
    "AdapterBenchmark": "romscale.bench.adapters",
    "AdapterBenchmarkConfig": "romscale.bench.adapters",
    "TrainConfig": "romscale.train.config",
    "get_memory": "romscale.memories.base",
    "save_memories": "romscale.meki.io",
    "load_memories": "romscale.meki.io",
    "export_native": "romscale.rom.onnx_export",
    "OrtDecoder": "romscale.rom.ort_runtime",
}

__all__ = [  # a literal list, so that static analysers read it; equals _EXPORTS + the two above
    "AdapterBank",
    "AdapterBenchmark",
    "AdapterBenchmarkConfig",
    "AdapterSlot",
    "ClusterProblem",
    "D2CConfig",
    "HydraBundle",
    "HydraOptConfig",
    "LoraTrainConfig",
    "MekiConfig",
    "MergeOptions",
    "OrtDecoder",
    "RomscaleError",
    "TaskBank",
    "TaskEvaluator",
    "TrainConfig",
    "__version__",
    "attach_meki",
    "detach_meki",
    "export_bundle",
    "export_native",
    "fit_hydraopt",
    "fold",
    "get_clusterer",
    "get_memory",
    "load_bundle",
    "load_causal_lm",
    "load_library",
    "load_meki",
    "load_memories",
    "merge_adapters",
    "parameter_report",
    "read_peft_adapter",
    "run_d2c",
    "save_meki",
    "save_memories",
    "train_task_adapters",
    "verify_bundle",
    "write_peft_adapter",
    "write_task_bank",
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
