"""Deploy bundles: export a folded MeKi model as a RAM part (safetensors + config) plus one packed
ROM table file, and run it with the table left on storage.

The runtime reads, for each forward call, the rows of exactly the tokens in that call: all layers'
rows of a token in one contiguous read, fetched as soon as its id is known (the decoder pre-hook),
optionally on a background thread that overlaps with the embedding and first layers' work.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from romscale.errors import CheckpointError, RomscaleError
from romscale.meki.attach import meki_branches, meki_state
from romscale.meki.io import CONFIG_FILE, load_meki, write_checkpoint
from romscale.rom.pagecache import release_free_memory
from romscale.rom.table import DTYPES, RomTable, write_table
from romscale.utils.atomic import atomic_dir


def export_bundle(model: nn.Module, out: str | Path, dtype: str = "fp16", tokenizer=None, block_rows: int = 4096) -> Path:
    """Write a deploy bundle of a folded MeKi model to `out` (atomically)."""
    state = meki_state(model)
    if state is None or not state.folded or state.external:
        raise RomscaleError("export needs a folded MeKi model with its tables in memory: call fold(model) first")
    if dtype not in DTYPES:
        raise RomscaleError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    branches = meki_branches(model)
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_checkpoint(model, tmp, tokenizer, skip_tables=True)
        write_table(
            tmp,
            [b.table for _, b in branches],
            dtype,
            layers=[i for i, _ in branches],
            meki=state.cfg.to_dict(),
            block_rows=block_rows,
        )
    return out


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


def load_bundle(path: str | Path, prefetch: bool = False, dtype: torch.dtype = torch.float32) -> Bundle:
    """Load the RAM part into memory and connect the ROM table, which stays on storage."""
    path = Path(path)
    model = load_meki(path, dtype=dtype)
    state = meki_state(model)
    if not state.external:
        raise CheckpointError(f"{path} is a MeKi checkpoint with inline tables, not a deploy bundle (see romscale export)")
    table = RomTable(path)
    try:
        _check_match(table, model, path)
    except CheckpointError:
        table.close()
        raise
    release_free_memory()  # drop the load's scratch copies before serving
    if prefetch:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rom-prefetch")
        state.row_source = lambda ids: pool.submit(table.rows, ids, dtype)
    else:
        state.row_source = lambda ids: table.rows(ids, dtype)
    return Bundle(model=model, table=table, path=path)
