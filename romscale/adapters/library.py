"""A library of per-task LoRA adapters trained by romscale (`romscale adapters train --out LIB`).

    LIB/romscale_manifest.json   kind "adapter-library"; lists library.json
    LIB/library.json             {"format": "romscale-adapter-library", "version": 1, "base": ..., "config": {...}}
    LIB/<task>/                  a PEFT adapter folder (kind "peft-adapter"); its manifest holds the run record
    LIB/runs.json                every finished task's run record (a romscale JSON, kind "adapter-runs")

LIB grows one task at a time, so its manifest lists only library.json; what else it may hold is
fixed: task folders that are complete romscale peft-adapter outputs (each checked against its own
manifest), runs.json, and the lock and temporary files of romscale's writers. Anything else means
someone else wrote into it, and it is refused. runs.json is rebuilt from the task manifests after
every task, so a kill between writing an adapter and the record loses nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from romscale.errors import AdapterError
from romscale.utils.outputs import (
    MANIFEST,
    check_target,
    member,
    output_dir,
    output_kind,
    read_json,
    read_manifest,
    sha256_file,
    write_json_output,
)

LIBRARY_KIND = "adapter-library"
RUNS_KIND = "adapter-runs"
ADAPTER_KIND = "peft-adapter"
LIBRARY_FILE = "library.json"
RUNS_FILE = "runs.json"
FORMAT = "romscale-adapter-library"
VERSION = 1
_DEBRIS = (".romscale-tmp-", ".romscale-new-", ".romscale-old-", ".romscale-lock")


def _is_debris(name: str) -> bool:
    return name.startswith(".") and any(tag in name for tag in _DEBRIS)


def check_library(lib: str | os.PathLike) -> dict[str, Any]:
    """Check LIB is a romscale adapter library (manifest, library.json, nothing foreign inside) and
    return library.json. Task folders are checked when they are read."""
    lib = Path(lib)
    if lib.is_symlink() or not lib.is_dir():
        raise AdapterError(f"{lib}: is not a folder; expected an adapter library written by romscale adapters train")
    m = read_json(lib / MANIFEST, AdapterError, f"was {lib} written by romscale adapters train?")
    if not isinstance(m, dict) or m.get("format") != "romscale" or m.get("kind") != LIBRARY_KIND:
        raise AdapterError(f"{lib / MANIFEST}: not a romscale {LIBRARY_KIND} manifest (kind {m.get('kind') if isinstance(m, dict) else None!r})")
    files = m.get("files")
    if not isinstance(files, dict) or set(files) != {LIBRARY_FILE}:
        raise AdapterError(f"{lib / MANIFEST}: an adapter library's manifest lists exactly {LIBRARY_FILE}")
    entry = files[LIBRARY_FILE]
    p = member(lib, LIBRARY_FILE, AdapterError, str(lib / MANIFEST))
    if not isinstance(entry, dict) or p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
        raise AdapterError(f"{p} does not match its entry in {lib / MANIFEST}: the file is corrupt or was edited")
    meta = read_json(p, AdapterError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("config"), dict):
        raise AdapterError(f"{p}: expected {{'format': {FORMAT!r}, 'version': {VERSION}, 'base': ..., 'config': {{...}}}}")
    for child in sorted(lib.iterdir()):
        name = child.name
        if name in (MANIFEST, LIBRARY_FILE) or _is_debris(name):
            continue
        if name == RUNS_FILE and child.is_file() and not child.is_symlink():
            continue
        if child.is_dir() and not child.is_symlink() and output_kind(child) == ADAPTER_KIND:
            continue
        raise AdapterError(f"{child}: romscale did not write this into the adapter library {lib}; "
                           "a library holds only its task adapter folders, library.json and runs.json")
    return meta


def create_library(lib: str | os.PathLike, base: str, config: dict[str, Any], *, inputs: Sequence[str | os.PathLike] = (),
                   overwrite: bool = False) -> Path:
    """Write a new, empty library (library.json only) through output_dir; with `overwrite`, an
    existing romscale library is replaced (its adapters are dropped)."""
    with output_dir(lib, kind=LIBRARY_KIND, inputs=inputs, overwrite=overwrite, what="--out") as out:
        import json

        doc = {"format": FORMAT, "version": VERSION, "base": base, "config": config}
        (out.path / LIBRARY_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out.target


def check_library_target(lib: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False) -> bool:
    """Whether `lib` is an existing library to resume (True) or a place a new one may go (False);
    raises OutputError for anything else (the rules of docs/outputs.md)."""
    resume = output_kind(Path(lib)) == LIBRARY_KIND and not overwrite
    # an existing library passes check_target as a same-kind output: that still checks inputs, links and cwd
    check_target(lib, kind=LIBRARY_KIND, inputs=inputs, overwrite=overwrite or resume, what="--out")
    return resume


def finished_adapter(lib: Path, task: str) -> dict[str, Any] | None:
    """The run record of task's adapter if LIB/<task> is a complete, intact romscale adapter; None
    if there is no folder. A damaged one is an error (it is not silently retrained)."""
    folder = lib / task
    if not os.path.lexists(folder):
        return None
    if output_kind(folder) != ADAPTER_KIND:
        raise AdapterError(f"{folder}: is not a complete romscale peft-adapter folder; remove it (it is not romscale's) "
                           "or start the library again with --overwrite")
    m = read_manifest(folder, ADAPTER_KIND, AdapterError)
    run = m.get("run")
    if not isinstance(run, dict):
        raise AdapterError(f"{folder / MANIFEST}: has no run record; this adapter was not trained into this library")
    return run


def library_tasks(lib: str | os.PathLike) -> list[str]:
    """Names of the finished task adapters, in training order (runs.json), then any others by name."""
    lib = Path(lib)
    check_library(lib)
    done = sorted(c.name for c in lib.iterdir() if c.is_dir() and not _is_debris(c.name) and output_kind(c) == ADAPTER_KIND)
    order: list[str] = []
    runs = lib / RUNS_FILE
    if runs.is_file():
        doc = read_json(runs, AdapterError)
        if isinstance(doc, dict) and isinstance(doc.get("order"), list):
            order = [t for t in doc["order"] if t in done]
    return order + [t for t in done if t not in order]


def write_runs(lib: Path, order: Sequence[str]) -> Path:
    """Rebuild LIB/runs.json from the task adapters' manifests (`order` first, then the rest)."""
    done = library_tasks(lib)
    names = [t for t in order if t in done] + [t for t in done if t not in order]
    runs = {t: read_manifest(lib / t, ADAPTER_KIND, AdapterError, hash_files=False)["run"] for t in names}
    meta = check_library(lib)
    return write_json_output(lib / RUNS_FILE, {"library": FORMAT, "base": meta.get("base"), "order": names, "runs": runs},
                             kind=RUNS_KIND, overwrite=True, what=str(lib / RUNS_FILE))


def load_library(lib: str | os.PathLike, tasks: Sequence[str] | None = None):
    """The library's finished adapters as an AdapterBank (names = task names), in training order or
    in the order of `tasks`; a task without a finished adapter is an error."""
    from romscale.adapters.bank import AdapterBank

    lib = Path(lib)
    done = library_tasks(lib)
    if not done:
        raise AdapterError(f"{lib}: holds no finished adapters yet (romscale adapters train --out {lib})")
    names = list(done if tasks is None else tasks)
    missing = [t for t in names if t not in done]
    if missing:
        raise AdapterError(f"{lib}: no finished adapter for {missing[:5]}; it has {done[:8]}{'...' if len(done) > 8 else ''}")
    return AdapterBank.load([lib / t for t in names], names=names)


def library_fingerprint(lib: str | os.PathLike, tasks: Sequence[str]) -> str:
    """sha256 over each task's name and the sha256 of its weight files, as its manifest records them
    (checked when the adapter is read): equal fingerprints mean bit-identical adapters. Config files are
    left out: they name the base model's path, which differs between machines."""
    import hashlib

    h = hashlib.sha256()
    for task in tasks:
        m = read_manifest(Path(lib) / task, ADAPTER_KIND, AdapterError)
        h.update(task.encode() + b"\0")
        for name, entry in sorted(m["files"].items()):
            if name.endswith(".safetensors"):
                h.update(f"{name}:{entry['sha256']}\n".encode())
    return h.hexdigest()


__all__ = ["LIBRARY_KIND", "RUNS_KIND", "check_library", "check_library_target", "create_library", "finished_adapter",
           "library_fingerprint", "library_tasks", "load_library", "write_runs"]
