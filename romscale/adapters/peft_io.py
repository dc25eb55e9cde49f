"""Reading and writing PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors).

Only plain LoRA on linear layers is accepted: every tensor must be a `lora_A.weight` (r x d_in) or a
`lora_B.weight` (d_out x r). Anything else (DoRA magnitudes, embedding LoRA, bias, modules_to_save)
is refused with a message naming the file, because an update that is not s * B @ A cannot be merged
by the methods in this package. Pickles are never unpickled: legacy `.bin` files go through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from peft.utils.other import get_pattern_key

from romscale.errors import AdapterError
from romscale.utils.atomic import atomic_dir

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")

# Config switches whose adapters do not store a plain s * B @ A update (or store extra tensors).
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) carry magnitude vectors; only plain LoRA can be merged",
    "lora_bias": "adapters with lora_bias=true carry bias tensors; only plain LoRA can be merged",
    "use_qalora": "QA-LoRA adapters are not supported",
}
_UNSUPPORTED_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def natural_key(name: str) -> list:
    """Sort key that orders `layers.2` before `layers.10` (numbers compared as numbers)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: the update is `scaling * B @ A`."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    alpha: float
    use_rslora: bool = False

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def scaling(self) -> float:
        # PEFT: alpha / sqrt(r) with rsLoRA, alpha / r otherwise (tuners/lora/layer.py update_layer).
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update (d_out x d_in), computed like PEFT's get_delta_weight."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: its PEFT config (as a dict) and its modules in natural order."""

    name: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    source: Path | None = None
    weights_file: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The PEFT state dict (keys `base_model.model.<module>.lora_A.weight`)."""
        out: dict[str, torch.Tensor] = {}
        for mod, lm in self.modules.items():
            for side, t in (("A", lm.A), ("B", lm.B)):
                t = t if dtype is None else t.to(dtype)
                out[f"{KEY_PREFIX}{mod}.lora_{side}.weight"] = t.detach().contiguous().cpu()
        return out


def _fail(path: Path, msg: str) -> AdapterError:
    return AdapterError(f"{path}: {msg}")


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_NAME
    if not folder.exists():
        raise AdapterError(f"{folder}: adapter folder does not exist")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: expected a PEFT adapter folder, found a file")
    if not cfg_path.is_file():
        raise _fail(cfg_path, "missing; a PEFT adapter folder needs adapter_config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(cfg_path, f"is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise _fail(cfg_path, "expected a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _fail(cfg_path, f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (peft_type LORA) are supported")
    for flag, why in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise _fail(cfg_path, why)
    if cfg.get("bias", "none") != "none":
        raise _fail(cfg_path, f"bias={cfg['bias']!r} stores bias tensors; only bias='none' can be merged")
    for key in ("modules_to_save", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise _fail(cfg_path, f"{key}={cfg[key]!r}: only LoRA factors on linear layers can be merged, not full modules, parameters or tokens")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INIT):
        raise _fail(cfg_path, f"init_lora_weights={init!r} changes the base weights; convert it to a plain LoRA first")
    return cfg


def _load_state(folder: Path) -> tuple[dict[str, torch.Tensor], Path, dict[str, str]]:
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        try:
            with safetensors.safe_open(str(st), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise _fail(st, f"cannot be read as safetensors ({exc}); the file is corrupt or truncated") from exc
        return state, st, meta
    legacy = folder / LEGACY_BIN_NAME
    if legacy.is_file():
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _fail(legacy, f"cannot be loaded with torch.load(weights_only=True) ({exc}); only plain tensors are accepted, pickled objects never") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise _fail(legacy, "expected a dict of tensors")
        return state, legacy, {}
    raise AdapterError(f"{folder}: no {SAFETENSORS_NAME} (or legacy {LEGACY_BIN_NAME}) in the adapter folder")


def resolve_rank_alpha(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """Rank and alpha PEFT gives `module`, following rank_pattern / alpha_pattern like PEFT does."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), cfg.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), cfg.get("lora_alpha", 8))
    return int(r), float(alpha)


def read_peft_adapter(folder: str | Path, name: str | None = None) -> LoraAdapter:
    """Load and validate one PEFT LoRA folder. Raises AdapterError naming the file on any problem."""
    folder = Path(folder)
    cfg = read_config(folder)
    state, wfile, meta = _load_state(folder)
    if not state:
        raise _fail(wfile, "holds no tensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, t in state.items():
        m = _KEY_RE.match(key)
        if m is None:
            bad.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["side"]] = t
    if bad:
        hint = ""
        if any("lora_embedding" in k for k in bad):
            hint = " (embedding LoRA is not supported)"
        elif any("magnitude" in k for k in bad):
            hint = " (DoRA magnitudes are not supported)"
        raise _fail(wfile, f"unexpected tensors {bad[:3]}{'...' if len(bad) > 3 else ''}; expected only "
                    f"<module>.lora_A.weight / <module>.lora_B.weight{hint}")
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for mod in sorted(pairs, key=natural_key):
        sides = pairs[mod]
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise _fail(wfile, f"module {mod} has no {missing}.weight; every module needs both factors")
        A, B = sides["A"], sides["B"]
        for side, t in (("lora_A", A), ("lora_B", B)):
            if t.dim() != 2:
                raise _fail(wfile, f"{mod}.{side}.weight has shape {tuple(t.shape)}; expected a 2-D linear LoRA factor (conv LoRA is not supported)")
            if not t.is_floating_point():
                raise _fail(wfile, f"{mod}.{side}.weight has dtype {t.dtype}; expected a floating-point tensor")
            bad_count = int((~torch.isfinite(t)).sum())
            if bad_count:
                raise _fail(wfile, f"{mod}.{side}.weight has {bad_count} NaN/Inf values")
        if A.shape[0] != B.shape[1]:
            raise _fail(wfile, f"module {mod}: lora_A has {A.shape[0]} rows but lora_B has {B.shape[1]} columns; they must share the rank")
        r_cfg, alpha = resolve_rank_alpha(cfg, mod)
        if r_cfg != A.shape[0]:
            raise _fail(folder / CONFIG_NAME, f"gives module {mod} rank {r_cfg} but its lora_A has {A.shape[0]} rows")
        modules[mod] = LoraModule(A=A, B=B, alpha=alpha, use_rslora=use_rslora)
    return LoraAdapter(name=name or folder.name, config=cfg, modules=modules, source=folder, weights_file=wfile, metadata=meta)


def derived_config(template: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """A PEFT config for a new adapter whose modules have `ranks` and scaling exactly 1.

    Scaling 1 (lora_alpha = r per module, no rsLoRA) means the stored factors are the whole update,
    so nothing depends on how a loader scales: this avoids the rsLoRA over-scaling PEFT's own
    add_weighted_adapter inherits from its first input.
    """
    cfg = copy.deepcopy(dict(template))
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 8
    pattern = {m: int(k) for m, k in ranks.items() if k != r}
    cfg.update(
        peft_type="LORA",
        r=int(r),
        lora_alpha=int(r),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        modules_to_save=None,
        init_lora_weights=True,
        inference_mode=True,
    )
    return cfg


def adapter_from_factors(name: str, template: Mapping[str, Any], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> LoraAdapter:
    """Wrap (A, B) pairs whose product is the full update (scaling 1) as a LoraAdapter."""
    ranks = {m: int(A.shape[0]) for m, (A, _) in factors.items()}
    cfg = derived_config(template, ranks)
    modules = {m: LoraModule(A=A, B=B, alpha=float(A.shape[0]), use_rslora=False) for m, (A, B) in factors.items()}
    return LoraAdapter(name=name, config=cfg, modules=modules)


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write over an input (inputs are never changed) or, unless asked, over anything."""
    for src in inputs:
        s, o = src.resolve(), out.resolve()
        if s == o or s.is_relative_to(o) or o.is_relative_to(s):
            raise AdapterError(f"{out}: output path is, contains or lies inside the input {src}; inputs are never overwritten")
    if out.exists() and not overwrite:
        raise AdapterError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")


def write_peft_adapter(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    protect: list[Path] | None = None,
) -> Path:
    """Write `adapter` as a PEFT folder atomically (temp folder + rename). Returns the folder."""
    out = Path(out)
    check_output_path(out, list(protect or []), overwrite)
    tensors = adapter.tensors(dtype)
    cfg = copy.deepcopy(adapter.config)
    meta = {"format": "pt"}
    with atomic_dir(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        safetensors.torch.save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata=meta)
    return out
