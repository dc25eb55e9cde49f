"""Deploy bundles: export a folded MeKi model as a RAM part (safetensors + config) plus one packed
ROM table file, and run it with the table left on storage.

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
