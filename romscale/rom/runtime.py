"""Deploy bundles: export a folded MeKi model as a RAM part (safetensors + config) plus one packed
ROM table file, and run it with the table left on storage. `export_memory_bundle` /
`load_memory_bundle` do the same for any memories (PLE, Engram, fat embedding, MeKi among them):
one ROM table per memory, keyed by memory type (kind "memory-bundle").

The runtime reads, for each forward call, the rows of exactly the tokens in that call: all layers'
rows of a token in one contiguous read, fetched as soon as its id is known (the decoder pre-hook),
optionally on a background thread that overlaps with the embedding and first layers' work. Every
row is checked against its checksum as it is read (romscale.rom.table).

A bundle folder is a romscale output of kind "meki-bundle": its romscale_manifest.json lists every
file (config.json, model.safetensors, tokenizer files, rom_manifest.json, the table) with size and
sha256. Loading checks all of them but the table's whole-file hash (the table is checked per row as
it is read, and in full by `verify_bundle`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from romscale.errors import CheckpointError, RomscaleError
from romscale.meki.attach import meki_branches, meki_state
from romscale.meki.io import BUNDLE_KIND, CONFIG_FILE, WEIGHTS_FILE, build_empty, check_weights, materialize, read_config, write_checkpoint
from romscale.rom.pagecache import release_free_memory
from romscale.rom.table import DTYPES, TABLE_FILE, RomTable, write_table
from romscale.utils.outputs import MANIFEST, member, output_dir, sha256_file


def export_bundle(
    model: nn.Module, out: str | Path, dtype: str = "fp16", tokenizer=None, block_rows: int = 4096, *,
    clamp: bool = False, overwrite: bool = False, inputs: Iterable[str | Path] = (),
) -> Path:
    """Write a deploy bundle of a folded MeKi model to the new folder `out`, crash-safely.

    Table values the dtype cannot hold are an error naming layer and row, unless `clamp`.
    An existing `out` is replaced only if it is a romscale bundle and `overwrite` is True;
    `inputs` are never written over or into."""
    state = meki_state(model)
    if state is None or not state.folded or state.external:
        raise RomscaleError("export needs a folded MeKi model with its tables in memory: call fold(model) first")
    if dtype not in DTYPES:
        raise RomscaleError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    branches = meki_branches(model)
    with output_dir(out, kind=BUNDLE_KIND, inputs=inputs, overwrite=overwrite, meta={"folded": True, "table_dtype": dtype}) as o:
        write_table(
            o.path,
            [b.table for _, b in branches],
            dtype,
            layers=[i for i, _ in branches],
            meki=state.cfg.to_dict(),
            block_rows=block_rows,
            clamp=clamp,
        )
        write_checkpoint(model, o.path, tokenizer, skip_tables=True)
    return Path(out)


@dataclass
class Bundle:
    model: nn.Module
    table: RomTable
    path: Path

    def close(self) -> None:
        state = meki_state(self.model)
        state.row_source = None
        self.table.close()


def _check_match(table: RomTable, model: nn.Module, path: Path) -> None:
    state = meki_state(model)
    m = table.manifest
    where = f"{path}: the ROM manifest does not match the RAM part ({CONFIG_FILE})"
    if m.get("meki") != state.cfg.to_dict():
        raise CheckpointError(f"{where}: MeKi config {m.get('meki')} vs {state.cfg.to_dict()}")
    vocab = model.get_input_embeddings().num_embeddings
    if m["vocab_size"] != vocab:
        raise CheckpointError(f"{where}: vocabulary {m['vocab_size']} vs {vocab}")
    layers = [i for i, _ in meki_branches(model)]
    if m["layers"] != layers or m["num_layers"] != len(layers) or m["d_mem"] != state.cfg.d_mem:
        raise CheckpointError(f"{where}: layers {m['layers']} / d_mem {m['d_mem']} vs {layers} / {state.cfg.d_mem}")


def load_bundle(path: str | Path, prefetch: bool = False, dtype: torch.dtype = torch.float32, *, verify_rows: bool = True) -> Bundle:
    """Load the RAM part into memory and connect the ROM table, which stays on storage.

    Checked before anything is allocated: the folder manifest (every file's size, every hash but
    the table's), config.json against the weights' header and the table's manifest. `verify_rows`
    checks each table row's checksum as it is read (on by default; ~73 us per token here, benchmarks/row_verify_cost.py)."""
    path = Path(path)
    manifest, hf_cfg, meki_cfg, folded, external = read_config(path, kinds=(BUNDLE_KIND,), skip_hash=(TABLE_FILE,))
    model = build_empty(hf_cfg, meki_cfg, folded, external)
    file = member(path, WEIGHTS_FILE, CheckpointError, str(path / MANIFEST))
    check_weights(file, model)
    table = RomTable(path, verify_rows=verify_rows)
    try:
        _check_match(table, model, path)  # config vs table shapes, before the weights are read
        materialize(model, file, dtype, "cpu").eval()
    except BaseException:
        table.close()
        raise
    release_free_memory()  # drop the load's scratch copies before serving
    state = meki_state(model)
    if prefetch:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rom-prefetch")
        state.row_source = lambda ids: pool.submit(table.rows, ids, dtype)
    else:
        state.row_source = lambda ids: table.rows(ids, dtype)
    return Bundle(model=model, table=table, path=path)


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle completely: every file's sha256 (the table's too), the config against the
    weights and the table, every block checksum and every row checksum. Returns a summary."""
    path = Path(path)
    manifest, hf_cfg, meki_cfg, folded, external = read_config(path, kinds=(BUNDLE_KIND,), skip_hash=(TABLE_FILE,))
    model = build_empty(hf_cfg, meki_cfg, folded, external)
    check_weights(member(path, WEIGHTS_FILE, CheckpointError, str(path / MANIFEST)), model)
    table = RomTable(path)
    try:
        _check_match(table, model, path)
        blocks = table.verify()  # names the first bad block and row
        if sha256_file(table.path) != manifest["files"][TABLE_FILE]["sha256"]:  # the header bytes too
            raise CheckpointError(f"{table.path} does not match its sha256 in {path / MANIFEST}: the file is corrupt")
        m = table.manifest
        return {
            "bundle": str(path), "files": len(manifest["files"]), "blocks": blocks, "rows": m["vocab_size"],
            "dtype": m["dtype"], "vocab_size": m["vocab_size"], "num_layers": m["num_layers"], "d_mem": m["d_mem"],
            "table_bytes": table.table_bytes,
        }
    finally:
        table.close()


# ---- every memory: one ROM table per memory, keyed by memory type ---------------------------------


def memory_table_files(name: str) -> tuple[str, str]:
    """(table file, ROM manifest file) of memory `name` in a memory bundle."""
    return f"rom_tables.{name}.safetensors", f"rom_manifest.{name}.json"


def export_memory_bundle(
    model: nn.Module, out: str | Path, dtype: str = "fp16", tokenizer=None, block_rows: int = 4096, *,
    clamp: bool = False, overwrite: bool = False, inputs: Iterable[str | Path] = (),
) -> Path:
    """Write a deploy bundle of a model with any memories: the RAM part plus, per memory, a ROM
    table (rom_tables.<memory>.safetensors + rom_manifest.<memory>.json) of the rows its
    `export_rows` gives (token-addressed for MeKi / PLE / fat, hashed n-gram ids for Engram).
    A MeKi-only model gets the classic meki-bundle (export_bundle). Foldable memories (MeKi) must
    be folded first."""
    from romscale.meki.io import MEMORY_BUNDLE_KIND, memory_meta
    from romscale.memories.base import attached_memories

    mems = attached_memories(model)
    if [m.name for m in mems] == ["meki"]:
        return export_bundle(model, out, dtype, tokenizer, block_rows, clamp=clamp, overwrite=overwrite, inputs=inputs)
    if not mems:
        raise RomscaleError("export needs a model with a memory attached")
    if dtype not in DTYPES:
        raise RomscaleError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    exports = [m.export_rows(model) for m in mems]  # raises for an unfolded MeKi, an external model
    with output_dir(out, kind=MEMORY_BUNDLE_KIND, inputs=inputs, overwrite=overwrite, meta={**memory_meta(model), "table_dtype": dtype}) as o:
        for rows in exports:
            table_file, manifest_file = memory_table_files(rows.memory)
            write_table(o.path, rows.tables, dtype, layers=rows.layers, meki=rows.config, block_rows=block_rows, clamp=clamp,
                        memory=rows.memory, address=rows.address, table_file=table_file, manifest_file=manifest_file)
        write_checkpoint(model, o.path, tokenizer, skip_tables=True)
    return Path(out)


@dataclass
class MemoryBundle:
    model: nn.Module
    tables: dict[str, RomTable]
    path: Path

    def close(self) -> None:
        from romscale.memories.base import get_memory

        for name, table in self.tables.items():
            get_memory(name).set_row_source(self.model, None)
            table.close()


def _open_memory_tables(path: Path, model: nn.Module, verify_rows: bool) -> dict[str, RomTable]:
    """Open and check every memory's ROM table against the RAM part; closes them on failure."""
    from romscale.memories.base import attached_memories

    tables: dict[str, RomTable] = {}
    try:
        for mem in attached_memories(model):
            _, manifest_file = memory_table_files(mem.name)
            table = tables[mem.name] = RomTable(path, verify_rows=verify_rows, manifest_file=manifest_file)
            m, where = table.manifest, f"{path}: {manifest_file} does not match the RAM part ({CONFIG_FILE})"
            rows, width, layers = mem.row_layout(model)
            cfg = mem.config_of(model).to_dict()
            # A MeKi table written by export_bundle has no "memory" / "address" keys: meki, token.
            if m.get("memory", "meki") != mem.name or m.get(mem.name) != cfg or m.get("address", "token") != mem.address:
                raise CheckpointError(f"{where}: {mem.name} config {m.get(mem.name)} vs {cfg}")
            if (m["vocab_size"], m["d_mem"], m["layers"]) != (rows, width, layers):
                raise CheckpointError(f"{where}: rows / width / layers {m['vocab_size']} / {m['d_mem']} / {m['layers']} vs {rows} / {width} / {layers}")
    except BaseException:
        for t in tables.values():
            t.close()
        raise
    return tables


def _checked_memory_bundle(path: Path, verify_rows: bool):
    """(manifest, empty model, weights file, open ROM tables) of a memory bundle, everything checked
    that can be before a weight is read (the tables' own files are hashed by `verify`, not here)."""
    from romscale.meki.io import MEMORY_BUNDLE_KIND, build_empty_memories, read_memory_config
    from romscale.memories.base import memory_names

    tables_files = [f for n in memory_names() for f in memory_table_files(n)]
    manifest, hf_cfg, sections = read_memory_config(path, kinds=(MEMORY_BUNDLE_KIND,), skip_hash=tables_files)
    model = build_empty_memories(hf_cfg, sections)
    file = member(path, WEIGHTS_FILE, CheckpointError, str(path / MANIFEST))
    check_weights(file, model)
    return manifest, model, file, _open_memory_tables(path, model, verify_rows)


def load_memory_bundle(path: str | Path, prefetch: bool = False, dtype: torch.dtype = torch.float32, *, verify_rows: bool = True) -> MemoryBundle:
    """Load a memory bundle's RAM part and connect each memory's ROM table, which stays on storage.
    Checked like load_bundle; rows are read per forward call for exactly the ids of that call
    (token ids, or Engram's hashed n-gram ids once the previous tokens are known)."""
    from romscale.memories.base import get_memory

    path = Path(path)
    _, model, file, tables = _checked_memory_bundle(path, verify_rows)
    try:
        materialize(model, file, dtype, "cpu").eval()
    except BaseException:
        for t in tables.values():
            t.close()
        raise
    release_free_memory()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rom-prefetch") if prefetch else None
    for name, table in tables.items():
        if pool is not None:
            source = lambda ids, t=table: pool.submit(t.rows, ids, dtype)
        else:
            source = lambda ids, t=table: t.rows(ids, dtype)
        get_memory(name).set_row_source(model, source)
    return MemoryBundle(model=model, tables=tables, path=path)


def verify_memory_bundle(path: str | Path) -> dict[str, Any]:
    """Check a memory bundle completely: every file's sha256, the config against the weights and
    each ROM table, every block and row checksum of every table. Returns a summary per memory."""
    path = Path(path)
    manifest, _, _, tables = _checked_memory_bundle(path, verify_rows=True)
    try:
        out = {}
        for name, table in tables.items():
            blocks = table.verify()
            if sha256_file(table.path) != manifest["files"][table.path.name]["sha256"]:
                raise CheckpointError(f"{table.path} does not match its sha256 in {path / MANIFEST}: the file is corrupt")
            m = table.manifest
            out[name] = {"blocks": blocks, "rows": m["vocab_size"], "address": m.get("address"), "dtype": m["dtype"],
                         "num_layers": m["num_layers"], "width": m["d_mem"], "table_bytes": table.table_bytes}
        return {"bundle": str(path), "files": len(manifest["files"]), "memories": out}
    finally:
        for t in tables.values():
            t.close()
