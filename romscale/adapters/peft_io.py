"""Reading and writing PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors).

Only plain LoRA on linear layers is accepted: every tensor must be a `lora_A.weight` (r x d_in) or a
`lora_B.weight` (d_out x r). Anything else (DoRA magnitudes, embedding LoRA, bias, modules_to_save)
is refused with a message naming the file, because an update that is not s * B @ A cannot be merged
by the methods in this package.

Reading is defensive, since adapters come from anywhere: both files must be plain files inside the
folder (no symbolic links), the JSON goes through the size-capped reader, the safetensors header is
checked against the file size before any tensor is allocated, and pickles are never loaded (a
folder with only `adapter_model.bin` gets an error saying how to convert it). A folder romscale
wrote carries `romscale_manifest.json`, which is checked (exact file list, sizes, sha256) first.
Writing goes through `romscale.utils.outputs.output_dir` (kind "peft-adapter").
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import safetensors
import safetensors.torch
import torch
from peft.utils.other import get_pattern_key

from romscale.adapters.order import natural_key
from romscale.adapters.storage import StorageReport
from romscale.errors import AdapterError
from romscale.utils.outputs import MANIFEST, member, output_dir, read_json, read_manifest

ADAPTER_KIND = "peft-adapter"  # romscale output kind of a PEFT LoRA folder
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")

# Config switches whose adapters do not store a plain s * B @ A update (or store extra tensors).
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) carry magnitude vectors; only plain LoRA can be merged",
    "lora_bias": "adapters with lora_bias=true carry bias tensors; only plain LoRA can be merged",
    "use_qalora": "QA-LoRA adapters are not supported",
}
_UNSUPPORTED_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


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


def _plain_file(folder: Path, name: str) -> Path | None:
    """folder/name if present, refusing symbolic links (they could point anywhere)."""
    if not os.path.lexists(folder / name):
        return None
    return member(folder, name, AdapterError, str(folder))


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise AdapterError(f"{folder}: adapter folder does not exist")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: expected a PEFT adapter folder, found a file")
    if os.path.lexists(folder / MANIFEST):  # written by romscale: check it is complete and intact
        read_manifest(folder, ADAPTER_KIND, AdapterError)


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = _plain_file(folder, CONFIG_NAME)
    if cfg_path is None:
        raise _fail(folder / CONFIG_NAME, "missing; a PEFT adapter folder needs adapter_config.json")
    cfg = read_json(cfg_path, AdapterError)
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
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()):
            raise _fail(cfg_path, f"{key} must be an object module -> number")
    return cfg


def safetensors_header(path: Path, error: type[Exception] = AdapterError) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, checked against the file's size
    (dtype known, offsets inside the file, sizes consistent) before anything is allocated."""
    size = path.stat().st_size
    bad = f"{path}: cannot be read as safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise error(f"{bad} (a header of {n} bytes in a file of {size:,}); the file is corrupt or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{bad} (header is not JSON: {exc}); the file is corrupt or truncated") from None
    if not isinstance(header, dict):
        raise error(f"{bad} (header is not an object); the file is corrupt or truncated")
    meta = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    for name, e in header.items():
        ok = isinstance(e, dict) and e.get("dtype") in _ST_ITEMSIZE and isinstance(e.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list) \
            and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"])
        if not ok:
            raise error(f"{bad} (entry {name!r} needs a known dtype, a shape and two data offsets); the file is corrupt")
        begin, end = e["data_offsets"]
        if not 0 <= begin <= end <= data or end - begin != math.prod(e["shape"]) * _ST_ITEMSIZE[e["dtype"]]:
            raise error(f"{bad} (tensor {name!r} at bytes {begin}-{end} of {data:,} data bytes does not fit its shape "
                        f"{e['shape']}); the file is corrupt or truncated")
    return header, {str(k): str(v) for k, v in dict(meta).items()}


def read_safetensors(path: Path, error: type[Exception] = AdapterError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _, meta = safetensors_header(path, error)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as exc:  # safetensors raises its own error types
        raise error(f"{path}: cannot be read as safetensors ({exc}); the file is corrupt or truncated") from exc


def _load_state(folder: Path) -> tuple[dict[str, torch.Tensor], Path, dict[str, str]]:
    st = _plain_file(folder, SAFETENSORS_NAME)
    if st is not None:
        state, meta = read_safetensors(st)
        return state, st, meta
    if os.path.lexists(folder / LEGACY_BIN_NAME):
        raise AdapterError(
            f"{folder / LEGACY_BIN_NAME}: pickled PyTorch weights; romscale never loads pickles. Convert the adapter to "
            f"{SAFETENSORS_NAME} (e.g. PeftModel.from_pretrained(base, folder).save_pretrained(new_folder), which writes safetensors)"
        )
    raise AdapterError(f"{folder}: no {SAFETENSORS_NAME} in the adapter folder")


def resolve_rank_alpha(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """Rank and alpha PEFT gives `module`, following rank_pattern / alpha_pattern like PEFT does."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), cfg.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), cfg.get("lora_alpha", 8))
    if not isinstance(r, int) or isinstance(r, bool) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{CONFIG_NAME}: rank {r!r} and alpha {alpha!r} of module {module} must be numbers (an integer rank)")
    return int(r), float(alpha)


def read_peft_adapter(folder: str | Path, name: str | None = None) -> LoraAdapter:
    """Load and validate one PEFT LoRA folder. Raises AdapterError naming the file on any problem."""
    folder = Path(folder)
    _check_folder(folder)
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


def write_adapter_files(adapter: LoraAdapter, folder: Path, dtype: torch.dtype | None = None) -> StorageReport:
    """adapter_config.json + adapter_model.safetensors into `folder` (created); returns the storage."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter.tensors(dtype)
    (folder / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    safetensors.torch.save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    return StorageReport.from_tensors((k.rsplit(".lora_", 1)[0], t) for k, t in tensors.items())


def write_peft_adapter(
    adapter: LoraAdapter,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
) -> Path:
    """Write `adapter` as a PEFT folder (factors in `dtype`, default as held) through output_dir:
    never over or into an input (`inputs`, and the adapter's own source), an existing folder only
    if it is a romscale peft-adapter and `overwrite`. Returns the folder."""
    inputs = [*inputs, *([adapter.source] if adapter.source is not None else [])]
    with output_dir(out, kind=ADAPTER_KIND, inputs=inputs, overwrite=overwrite, what=what) as o:
        st = write_adapter_files(adapter, o.path, dtype)
        o.meta["adapter"] = {"name": adapter.name, "storage": st.to_dict(per_module=False)}
    return o.target
