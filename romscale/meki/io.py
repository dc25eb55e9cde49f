"""Save and load MeKi models: a folder with config.json (HF config + a "meki" section) and
model.safetensors, for the training form and the folded form alike. No pickle anywhere.

The folder keeps Hugging Face's names (config.json, model.safetensors, tokenizer files) and the
base model's tensor names, so the base part stays readable by other tools.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from romscale.errors import CheckpointError
from romscale.meki.attach import MEKI_CONFIG_KEY, attach_meki, meki_state
from romscale.meki.config import MekiConfig
from romscale.utils.atomic import atomic_dir, atomic_write_json, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "romscale_manifest.json"
FORMAT_TAG = "romscale.meki"
FORMAT_VERSION = 1


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_meki(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write `model` (training or folded form) to the folder `path`, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_checkpoint(model, tmp, tokenizer)
    return path


def _ram_tensors(model: nn.Module, skip_tables: bool) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for key, t in model.state_dict().items():
        if skip_tables and key.endswith(".meki.table"):
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().contiguous()
    return out


def write_checkpoint(model: nn.Module, folder: Path, tokenizer=None, skip_tables: bool = False) -> None:
    """Write config.json, model.safetensors and the manifest into an existing folder.

    `skip_tables`: leave the folded tables out and mark them external (the RAM part of a deploy
    bundle, whose tables go to a ROM file).
    """
    state = meki_state(model)
    if state is None:
        raise CheckpointError(f"cannot save to {folder}: the model has no MeKi attached")
    if skip_tables and not state.folded:
        raise CheckpointError("only a folded model has tables to keep apart; call fold(model) first")
    model.config.save_pretrained(folder)
    if skip_tables:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        cfg[MEKI_CONFIG_KEY]["tables"] = "external"
        atomic_write_json(folder / CONFIG_FILE, cfg)
    weights = folder / WEIGHTS_FILE
    save_file(_ram_tensors(model, skip_tables), str(weights), metadata={"format": "pt", "producer": FORMAT_TAG})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    # safetensors has no checksum of its own: a flipped byte in the data would load silently.
    atomic_write_json(
        folder / MANIFEST_FILE,
        {
            "format": FORMAT_TAG,
            "version": FORMAT_VERSION,
            "folded": state.folded,
            "files": {WEIGHTS_FILE: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
        },
    )


def _check_manifest(path: Path) -> None:
    file = path / MANIFEST_FILE
    manifest = read_json(file, CheckpointError, "was this folder written by romscale's save_meki?")
    try:
        version, files = manifest["version"], manifest["files"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} is not a valid romscale manifest: {exc}") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unknown format version {version!r}; this romscale reads version {FORMAT_VERSION}")
    for name, entry in files.items():
        target = path / name
        if not target.is_file():
            raise CheckpointError(f"{target} is missing (listed in {file})")
        if target.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{target} has {target.stat().st_size} bytes, the manifest says {entry['bytes']}: truncated or replaced"
            )
        if _sha256(target) != entry["sha256"]:
            raise CheckpointError(f"{target} does not match its sha256 in {file}: the file is corrupt")


def _read_config(path: Path):
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; expected a MeKi checkpoint folder")
    raw = read_json(cfg_file, CheckpointError, f"a MeKi checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    section = raw.get(MEKI_CONFIG_KEY)
    if not isinstance(section, dict):
        raise CheckpointError(f"{cfg_file} has no '{MEKI_CONFIG_KEY}' section: it is not a MeKi checkpoint")
    section = dict(section)
    folded = section.pop("folded", None)
    tables = section.pop("tables", "inline")
    if tables not in ("inline", "external"):
        raise CheckpointError(f"{cfg_file}: '{MEKI_CONFIG_KEY}.tables' must be 'inline' or 'external', got {tables!r}")
    if not isinstance(folded, bool):
        raise CheckpointError(f"{cfg_file}: '{MEKI_CONFIG_KEY}.folded' must be true or false, got {folded!r}")
    try:
        meki_cfg = MekiConfig.from_dict(section)
        hf_cfg = AutoConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{cfg_file} is not a valid config: {exc}") from exc
    return hf_cfg, meki_cfg, folded, tables == "external"


def _check_weights(file: Path, model: nn.Module) -> None:
    """Compare the file's tensor names and shapes with the model's before trusting its data."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{file} holds tensors this model does not have, e.g. {unexpected[:3]}; "
            "does config.json (incl. its 'meki' section and 'folded' flag) belong to these weights?"
        )
    for k, shape in found.items():
        if shape != expected[k]:
            raise CheckpointError(
                f"{file}: tensor {k} has shape {shape} but config.json implies {expected[k]} "
                "(vocabulary size, hidden size or d_mem mismatch)"
            )
    missing = [k for k in expected if k not in found and not _is_tied_duplicate(model, k, found)]
    if missing:
        raise CheckpointError(f"{file} lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")


def _is_tied_duplicate(model: nn.Module, key: str, found: dict) -> bool:
    """True when `key` shares storage with a tensor present in the file (tied embeddings)."""
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k in found and sd[k].data_ptr() == ptr for k in sd if k != key)


def load_meki(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by `save_meki`: the same form (training or folded), identical logits.

    A deploy bundle's RAM part loads in the external form; use romscale.rom.runtime.load_bundle to
    connect its ROM table."""
    path = Path(path)
    hf_cfg, meki_cfg, folded, external = _read_config(path)
    _check_manifest(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    attach_meki(model, meki_cfg, folded=folded, external=external)
    file = path / WEIGHTS_FILE
    _check_weights(file, model)
    try:
        missing, unexpected = load_model(model, str(file), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file} could not be read (truncated or corrupt?): {exc}") from exc
    # load_model reports the tied duplicates it left out as missing; _check_weights vetted the rest.
    if unexpected:
        raise CheckpointError(f"{file} holds unexpected tensors {unexpected[:3]}")
    return model.eval()
