"""Save and load models with memories (MeKi, PLE, Engram, fat embedding): a folder with config.json
(the HF config plus one section per attached memory, keyed by memory type: "meki", "ple", "engram",
"fat") and model.safetensors, for the training form and the folded form alike. No pickle anywhere.

A MeKi-only model is a "meki-checkpoint" (save_meki / load_meki, as before); any other set of
memories is a "memory-checkpoint" (save_memories / load_memories, which read both kinds).

The folder keeps Hugging Face's names (config.json, model.safetensors, tokenizer files) and the
base model's tensor names, so the base part stays readable by other tools. Its romscale_manifest.json
(romscale.utils.outputs) lists every file with its size and sha256: config.json and the tokenizer
change behaviour as much as the weights do.

Loading trusts nothing before it is checked: the manifest first (exact file list, sizes, hashes),
then the model is built on the meta device (nothing allocated, no random initialisation) and every
tensor's name, shape and dtype in the safetensors header is compared with what config.json implies;
only then are the weights read, straight into the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from romscale.errors import CheckpointError
from romscale.meki.attach import MEKI_CONFIG_KEY, meki_state
from romscale.meki.config import MekiConfig
from romscale.memories.base import attached_memories, get_memory, memory_names
from romscale.utils.outputs import MANIFEST, member, output_dir, read_json, read_manifest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = MANIFEST
CHECKPOINT_KIND = "meki-checkpoint"
BUNDLE_KIND = "meki-bundle"  # a deploy bundle: this folder's RAM part plus a ROM table (romscale.rom)
MEMORY_CHECKPOINT_KIND = "memory-checkpoint"  # any memories other than MeKi alone
MEMORY_BUNDLE_KIND = "memory-bundle"
MEKI_KINDS = (CHECKPOINT_KIND, BUNDLE_KIND)
ALL_KINDS = (CHECKPOINT_KIND, BUNDLE_KIND, MEMORY_CHECKPOINT_KIND, MEMORY_BUNDLE_KIND)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def save_meki(
    model: nn.Module, path: str | Path, tokenizer=None, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Write `model` (training or folded form) to the new folder `path`, crash-safely.

    An existing `path` is replaced only if it is a romscale MeKi checkpoint and `overwrite` is
    True; `inputs` (e.g. the folder the model came from) can never be written over or into."""
    state = meki_state(model)
    if state is None:
        raise CheckpointError(f"cannot save to {path}: the model has no MeKi attached")
    if state.external:
        raise CheckpointError(
            f"cannot save to {path}: this model is a deploy bundle's RAM part (its tables live in the bundle's ROM file); "
            "a checkpoint needs the tables in memory: save from the folded checkpoint instead"
        )
    with output_dir(path, kind=CHECKPOINT_KIND, inputs=inputs, overwrite=overwrite, meta={"folded": state.folded}) as out:
        write_checkpoint(model, out.path, tokenizer)
    return Path(path)


def checkpoint_kind(model: nn.Module, bundle: bool = False) -> str:
    """meki-checkpoint / meki-bundle for a model whose only memory is MeKi, memory-* otherwise."""
    names = [m.name for m in attached_memories(model)]
    if names == ["meki"]:
        return BUNDLE_KIND if bundle else CHECKPOINT_KIND
    return MEMORY_BUNDLE_KIND if bundle else MEMORY_CHECKPOINT_KIND


def memory_meta(model: nn.Module) -> dict:
    """The manifest's record of the attached memories, checked against config.json on load."""
    mems = attached_memories(model)
    meta = {"memories": {m.name: {"folded": m.is_folded(model)} for m in mems}}
    if [m.name for m in mems] == ["meki"]:
        meta["folded"] = mems[0].is_folded(model)
    return meta


def save_memories(
    model: nn.Module, path: str | Path, tokenizer=None, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Write a model with any memories attached (training or folded form) to the new folder `path`.

    Same contract as save_meki; config.json carries one section per memory, keyed by its type."""
    mems = attached_memories(model)
    if not mems:
        raise CheckpointError(f"cannot save to {path}: the model has no memory attached (one of {', '.join(memory_names())})")
    external = [m.name for m in mems if getattr(model.config, m.name, {}).get("tables") == "external"]
    if external:
        raise CheckpointError(
            f"cannot save to {path}: this model is a deploy bundle's RAM part ({', '.join(external)} tables live in the bundle's ROM file)"
        )
    with output_dir(path, kind=checkpoint_kind(model), inputs=inputs, overwrite=overwrite, meta=memory_meta(model)) as out:
        write_checkpoint(model, out.path, tokenizer)
    return Path(path)


def _ram_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().contiguous()
    return out


def write_checkpoint(model: nn.Module, folder: Path, tokenizer=None, skip_tables: bool = False) -> None:
    """Write config.json, model.safetensors (and the tokenizer) into `folder`, which the caller
    owns (an output_dir's temporary folder: it adds the manifest).

    `skip_tables`: leave the memories' ROM tables out and mark them external (the RAM part of a
    deploy bundle, whose tables go to a ROM file).
    """
    mems = attached_memories(model)
    if not mems:
        raise CheckpointError(f"cannot save to {folder}: the model has no MeKi attached")
    state = meki_state(model)
    if skip_tables and state is not None and not state.folded:
        raise CheckpointError("only a folded model has tables to keep apart; call fold(model) first")
    cfg = model.config.to_dict()
    skip: set[str] = set()
    for m in mems:
        cfg[m.name] = {**cfg[m.name], "tables": "external" if skip_tables else "inline"}
        if skip_tables:
            skip.update(m.rom_param_names(model))
    cfg.pop("quantization_config", None)  # a GGUF origin's de-quantised weights are plain tensors now
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    producer = "romscale.meki" if [m.name for m in mems] == ["meki"] else "romscale.memories"
    save_file(_ram_tensors(model, skip), str(folder / WEIGHTS_FILE), metadata={"format": "pt", "producer": producer})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _section(raw: dict, name: str, cfg_file: Path):
    """(config, folded, external) of one memory's config.json section."""
    section = raw.get(name)
    if not isinstance(section, dict):
        raise CheckpointError(f"{cfg_file}: '{name}' must be an object (the {name} config)")
    section = dict(section)
    folded = section.pop("folded", None)
    tables = section.pop("tables", "inline")
    if tables not in ("inline", "external"):
        raise CheckpointError(f"{cfg_file}: '{name}.tables' must be 'inline' or 'external', got {tables!r}")
    if not isinstance(folded, bool):
        raise CheckpointError(f"{cfg_file}: '{name}.folded' must be true or false, got {folded!r}")
    try:
        mem_cfg = get_memory(name).config_cls.from_dict(section)
    except Exception as exc:
        raise CheckpointError(f"{cfg_file} is not a valid config: {exc}") from exc
    return mem_cfg, folded, tables == "external"


def read_memory_config(path: Path, kinds: tuple[str, ...] = ALL_KINDS, skip_hash: Iterable[str] = ()):
    """Check the folder's manifest, then parse config.json. Returns (manifest, hf_cfg, sections)
    with sections = {memory name: (config, folded, external)}, in memory-name order. Nothing is
    allocated."""
    from transformers import CONFIG_MAPPING

    path = Path(path)
    manifest = read_manifest(path, kinds, CheckpointError, skip_hash=skip_hash)
    cfg_file = member(path, CONFIG_FILE, CheckpointError, str(path / MANIFEST_FILE))
    raw = read_json(cfg_file, CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object (a Hugging Face config)")
    names = [n for n in memory_names() if n in raw]
    if manifest["kind"] in MEKI_KINDS and not isinstance(raw.get(MEKI_CONFIG_KEY), dict):
        raise CheckpointError(f"{cfg_file} has no '{MEKI_CONFIG_KEY}' section: it is not a MeKi checkpoint")
    if not names:
        raise CheckpointError(f"{cfg_file} has no memory section (one of {', '.join(memory_names())}): it is not a romscale memory checkpoint")
    sections = {n: _section(raw, n, cfg_file) for n in names}
    bundle = manifest["kind"] in (BUNDLE_KIND, MEMORY_BUNDLE_KIND)
    recorded = manifest.get("memories")
    for n, (_, folded, external) in sections.items():
        legacy = manifest["kind"] in MEKI_KINDS and manifest.get("folded", folded) != folded
        listed = recorded is not None and (not isinstance(recorded, dict) or recorded.get(n) != {"folded": folded})
        if bundle != external or legacy or listed:
            raise CheckpointError(
                f"{cfg_file} contradicts {path / MANIFEST_FILE} (kind {manifest['kind']}, {n}: tables "
                f"{'external' if external else 'inline'}, folded {folded})"
            )
    if recorded is not None and (not isinstance(recorded, dict) or sorted(recorded) != names):
        raise CheckpointError(f"{cfg_file} contradicts {path / MANIFEST_FILE}: memories {names} vs {recorded!r}")
    if manifest["kind"] in MEKI_KINDS and names != [MEKI_CONFIG_KEY]:
        raise CheckpointError(f"{cfg_file} contradicts {path / MANIFEST_FILE}: a {manifest['kind']} holds MeKi only, not {names}")
    try:
        model_type = raw.get("model_type")
        if not isinstance(model_type, str):
            raise ValueError("'model_type' is missing")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {model_type!r}")
        hf_cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k not in sections})
    except Exception as exc:  # transformers raises ValueError/KeyError/TypeError for a bad config
        raise CheckpointError(f"{cfg_file} is not a valid config: {exc}") from exc
    return manifest, hf_cfg, sections


def read_config(path: Path, kinds: tuple[str, ...] = MEKI_KINDS, skip_hash: Iterable[str] = ()):
    """MeKi checkpoints: (manifest, hf_cfg, meki_cfg, folded, external). Nothing is allocated."""
    manifest, hf_cfg, sections = read_memory_config(path, kinds, skip_hash)
    if MEKI_CONFIG_KEY not in sections:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} has no '{MEKI_CONFIG_KEY}' section: it is not a MeKi checkpoint")
    meki_cfg, folded, external = sections[MEKI_CONFIG_KEY]
    return manifest, hf_cfg, meki_cfg, folded, external


def build_empty_memories(hf_cfg, sections: dict) -> nn.Module:
    """The model with every parameter on the meta device (no memory, no random init) and each
    memory of `sections` ({name: (config, folded, external)}) attached; buffers that the modules
    compute themselves (rotary frequencies) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from romscale.errors import RomscaleError

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_cfg)
            for name, (cfg, folded, external) in sections.items():
                get_memory(name).attach(model, cfg, folded=folded, external=external)
    except RomscaleError as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:
        raise CheckpointError(f"config.json describes a model that cannot be built: {exc}") from exc
    return model


def build_empty(hf_cfg, meki_cfg: MekiConfig, folded: bool, external: bool) -> nn.Module:
    """build_empty_memories for a MeKi-only model."""
    return build_empty_memories(hf_cfg, {MEKI_CONFIG_KEY: (meki_cfg, folded, external)})


def check_weights(file: Path, model: nn.Module) -> None:
    """Compare the file's tensor names, shapes and dtypes with the (meta) model before reading data."""
    expected = model.state_dict(keep_vars=True)
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{file} holds tensors this model does not have, e.g. {unexpected[:3]}; "
            "does config.json (incl. its 'meki' section and 'folded' flag) belong to these weights?"
        )
    for k, (shape, dtype) in found.items():
        if shape != tuple(expected[k].shape):
            raise CheckpointError(
                f"{file}: tensor {k} has shape {shape} but config.json implies {tuple(expected[k].shape)} "
                "(vocabulary size, hidden size or d_mem mismatch)"
            )
        if dtype not in _ST_DTYPES.values():
            raise CheckpointError(f"{file}: tensor {k} has dtype {dtype}; expected a floating dtype (F32, F16, BF16)")
    missing = [k for k in expected if k not in found and not _is_tied_duplicate(model, k, found)]
    if missing:
        raise CheckpointError(f"{file} lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")


def _is_tied_duplicate(model: nn.Module, key: str, found: dict) -> bool:
    """True when `key` is tied to a tensor present in the file (tied embeddings): transformers'
    own tie map (target -> source), read in both directions as its loader does."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return tied.get(key) in found or any(src == key and tgt in found for tgt, src in tied.items())


def materialize(model: nn.Module, file: Path, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """Read the checked weights into the meta-built model (assigning, not copying into random init)."""
    try:
        tensors = load_file(str(file), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file} could not be read (truncated or corrupt?): {exc}") from exc
    # load_file maps the file; private copies make the model independent of it (a file replaced or
    # truncated while the model runs cannot fault it) and keep RAM accounting plain (heap, not
    # file pages that stay mapped while any one tensor of the file is alive).
    tensors = {k: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t.clone() for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{file} left parameters unset: {left[:3]}")
    return model.to(device=device, dtype=dtype)


def load_meki(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a folder written by `save_meki`: the same form (training or folded), identical logits.

    A deploy bundle's RAM part loads in the external form; use romscale.rom.runtime.load_bundle to
    connect its ROM table."""
    path = Path(path)
    _, hf_cfg, meki_cfg, folded, external = read_config(path)
    model = build_empty(hf_cfg, meki_cfg, folded, external)
    file = member(path, WEIGHTS_FILE, CheckpointError, str(path / MANIFEST_FILE))
    check_weights(file, model)
    return materialize(model, file, dtype, device).eval()


def load_memories(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a folder written by `save_memories` (or `save_meki`): every memory of its config.json,
    in the form it was saved, identical logits. Checked like load_meki before anything is read."""
    path = Path(path)
    _, hf_cfg, sections = read_memory_config(path, (CHECKPOINT_KIND, MEMORY_CHECKPOINT_KIND))
    model = build_empty_memories(hf_cfg, sections)
    file = member(path, WEIGHTS_FILE, CheckpointError, str(path / MANIFEST_FILE))
    check_weights(file, model)
    return materialize(model, file, dtype, device).eval()
