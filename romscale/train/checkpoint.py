"""Run folders and atomic training checkpoints (no pickles: safetensors for tensors, JSON for the rest).

A run folder RUN holds:
    RUN/run.json        romscale JSON (kind "train-run"): the config, the status, the summary at the end
    RUN/metrics.jsonl   one JSON object per logged step (appended while training)
    RUN/checkpoint/     romscale folder (kind "train-checkpoint"), replaced atomically at every save:
        model.safetensors      the model's state dict (tied weights stored once; safetensors.torch.save_model)
        config.json            the transformers config (with the memory's section), so transformers can read it
        optimizer.safetensors  every AdamW state tensor, named state.<parameter name>.<key>
        rng.safetensors        each process's torch (and CUDA) generator state, named rank<r>.torch / rank<r>.cuda<d>
        state.json             step, data position, scheduler state, optimiser param groups, python/numpy
                               RNG per process, the training config, the metrics window
        metrics.jsonl          the metrics rows up to this step (resume restores RUN/metrics.jsonl from it)
    RUN/model/          the final model: a MeKi checkpoint (kind "meki-checkpoint") or, for a dense model,
                        a transformers folder (kind "lm-model"), each with the corpus tokenizer

RUN itself is not swapped in one piece (it grows while training); it is romscale's when it holds
run.json of kind "train-run", and only then is it resumed or (with overwrite) cleared, and only the
entries listed above are removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from romscale.errors import CheckpointError
from romscale.utils.outputs import OutputError, output_kind, read_json

if TYPE_CHECKING:
    import torch
    from torch import nn

RUN_KIND = "train-run"
CHECKPOINT_KIND = "train-checkpoint"
MODEL_KINDS = ("meki-checkpoint", "memory-checkpoint", "lm-model")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
STATE_FORMAT = "romscale-train-state"
STATE_VERSION = 1


# -- the run folder ---------------------------------------------------------------------------------
def _is_run(folder: Path) -> bool:
    f = folder / RUN_FILE
    if f.is_symlink() or not f.is_file():
        return False
    try:
        obj = read_json(f, OutputError)
    except OutputError:
        return False
    return isinstance(obj, dict) and obj.get("romscale_output") == RUN_KIND


def run_status(out: str | os.PathLike, *, resume: bool, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
               what: str = "--out") -> str:
    """"new", "resume" (a complete checkpoint is there) or "restart"; raises OutputError when the
    folder may not be used (also when it is, holds or lies inside an input). No side effects: CLIs
    call it before any work."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{what} {out}: is a symbolic link; give the real path")
    here = out.absolute().parent.resolve() / out.name
    for i in inputs:
        there = Path(i).resolve()
        if here == there or here.is_relative_to(there) or there.is_relative_to(here):
            raise OutputError(f"{what} {out}: is, holds or lies inside the input {i}; choose a folder outside it")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    if not out.is_dir():
        raise OutputError(f"{what} {out}: exists and is not a folder")
    if not _is_run(out):
        raise OutputError(f"{what} {out}: exists and is not a romscale training run (no {RUN_FILE} of kind {RUN_KIND}); "
                          "romscale only reuses folders it wrote; choose a new folder")
    if resume and overwrite:
        raise OutputError(f"{what} {out}: give --resume or --overwrite, not both")
    if resume:
        return "resume" if output_kind(out / CHECKPOINT_DIR) == CHECKPOINT_KIND else "restart"
    if overwrite:
        return "restart"
    raise OutputError(f"{what} {out}: already holds a training run; pass --resume to continue it or --overwrite to start again")


def clear_run(out: Path) -> None:
    """Remove what romscale wrote in a run folder (and nothing else), to start the run again."""
    for name, kinds in ((CHECKPOINT_DIR, (CHECKPOINT_KIND,)), (MODEL_DIR, MODEL_KINDS)):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            if output_kind(p) not in kinds:
                raise OutputError(f"{p}: is not a romscale {' or '.join(kinds)} output; refusing to remove it")
            shutil.rmtree(p)
    m = out / METRICS_FILE
    if m.is_file() and not m.is_symlink():
        m.unlink()


def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """Replace RUN/metrics.jsonl with `rows` (write beside, then rename)."""
    tmp = out / f".{METRICS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / METRICS_FILE)


# -- state to tensors + JSON ------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states: (JSON part: python, numpy; tensor part: torch, cuda)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached)}}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{d}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    n = js["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{d}"] for d in range(torch.cuda.device_count()) if f"cuda{d}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another name of an earlier parameter (a tied output projection):
    stored once, under the first name."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def full_states(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) model and optimizer state dicts, keyed by parameter name, on the CPU of
    the main process (empty elsewhere). torch.distributed.checkpoint's API gathers plain, DDP and
    FSDP (1 and 2) models alike; every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def set_optimizer_state(model, optimizer, osd: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state dict (every process holds it) into the prepared model's optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A name-keyed optimizer state dict as (JSON: param groups and non-tensor state, tensors:
    state.<parameter name>.<key>)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in osd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{name}.{key}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(name), {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def unflatten_optimizer(js: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        head, _, leaf = key.rpartition(".")
        if not head.startswith("state.") or not leaf:
            raise CheckpointError(f"{where}: unexpected optimizer tensor {key!r}")
        state.setdefault(head[len("state."):], {})[leaf] = t
    for name, extra in js.get("scalars", {}).items():
        state.setdefault(name, {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in js["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- writing and reading checkpoints ----------------------------------------------------------------
def save_checkpoint(folder: Path, *, model_state: dict[str, torch.Tensor], aliases: set[str], optimizer_state: dict[str, Any],
                    hf_config, scheduler, state: dict[str, Any], rng: list[tuple[dict[str, Any], dict[str, torch.Tensor]]],
                    metrics: list[dict[str, Any]], inputs: list[Path]) -> None:
    """Write the checkpoint folder crash-safely (romscale.utils.outputs.output_dir, replaced whole).

    `model_state` / `optimizer_state`: full state dicts (full_states); `aliases`: tied names stored
    once; `state`: step, stream, config, ... (JSON); `rng`: one (json, tensors) pair per process."""
    from safetensors.torch import save_file

    from romscale.utils.outputs import output_dir

    opt_js, opt_tensors = flatten_optimizer(optimizer_state)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k not in aliases}
    rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (_, ts) in enumerate(rng) for k, v in ts.items()}
    body = {"format": STATE_FORMAT, "version": STATE_VERSION, **state, "optimizer": opt_js,
            "scheduler": scheduler.state_dict(), "rng": [js for js, _ in rng]}
    with output_dir(folder, kind=CHECKPOINT_KIND, inputs=inputs, overwrite=True, what="checkpoint",
                    meta={"step": state["step"]}) as o:
        save_file(weights, str(o.path / "model.safetensors"), metadata={"format": "pt"})
        hf_config.to_json_file(str(o.path / "config.json"))
        save_file(opt_tensors, str(o.path / "optimizer.safetensors"))
        save_file(rng_tensors, str(o.path / "rng.safetensors"))
        (o.path / "state.json").write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        with open(o.path / METRICS_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in metrics)


def read_state(folder: Path) -> dict[str, Any]:
    """The checked manifest and state.json of a checkpoint folder."""
    from romscale.utils.outputs import member, read_manifest

    read_manifest(folder, CHECKPOINT_KIND, CheckpointError)
    where = str(folder / "state.json")
    st = read_json(member(folder, "state.json", CheckpointError, where), CheckpointError)
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT or st.get("version") != STATE_VERSION:
        raise CheckpointError(f"{where}: not a {STATE_FORMAT} version {STATE_VERSION} file")
    for key in ("step", "stream", "optimizer", "scheduler", "rng", "config", "metrics_window"):
        if key not in st:
            raise CheckpointError(f"{where}: missing {key!r}")
    return st


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    from romscale.utils.outputs import member

    p = member(folder, METRICS_FILE, CheckpointError, str(folder))
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p}: line {n} is not valid JSON ({exc.msg})") from None
    return rows


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load model.safetensors into an unprepared `model`, strictly: the names and shapes must match
    (tied aliases, stored once, are the only names allowed to be absent)."""
    from safetensors.torch import load_file

    file = folder / "model.safetensors"
    try:
        missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file}: does not match the configured model ({' '.join(str(exc).split())[:500]})") from None
    missing = sorted(set(missing) - tied_aliases(model))
    if missing or unexpected:
        raise CheckpointError(f"{file}: does not match the configured model (missing {missing[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_training_state(folder: Path, st: dict[str, Any], model, optimizer, scheduler, rank: int) -> None:
    """Restore the optimizer (into the prepared `model`'s optimizer), the scheduler and this
    process's RNG from a checkpoint (after read_state)."""
    from safetensors.torch import load_file

    where = str(folder)
    osd = unflatten_optimizer(st["optimizer"], load_file(str(folder / "optimizer.safetensors")), where)
    try:
        set_optimizer_state(model, optimizer, osd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: the optimizer state does not fit this model ({' '.join(str(exc).split())[:500]})") from None
    scheduler.load_state_dict(st["scheduler"])
    rngs = st["rng"]
    r = rank % len(rngs)  # a different process count: the saved states are reused round-robin
    tensors = {k.split(".", 1)[1]: v for k, v in load_file(str(folder / "rng.safetensors")).items() if k.startswith(f"rank{r}.")}
    set_rng_state(rngs[r], tensors)


def load_trained_model(run_or_checkpoint: str | os.PathLike) -> nn.Module:
    """The model of a run folder's checkpoint (or of a checkpoint folder), in training form, eval mode."""
    from romscale.train.build import build_model
    from romscale.train.config import config_from_dict

    folder = Path(run_or_checkpoint)
    if (folder / CHECKPOINT_DIR).is_dir():
        folder = folder / CHECKPOINT_DIR
    st = read_state(folder)
    cfg = config_from_dict(st["config"], str(folder / "state.json"))
    hf = read_json(folder / "config.json", CheckpointError)
    model = build_model(cfg, hf["vocab_size"], hf.get("eos_token_id"))
    load_model_weights(model, folder)
    return model.eval()
