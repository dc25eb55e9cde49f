"""The ROM table file: all layers' folded MeKi tables packed token-major, [|V|, L x d_mem], so one
token's rows for every layer are one contiguous read.

On disk it is a plain safetensors file (tensor "table", plus "scales" [|V|, L] fp16 for int8), which
any safetensors tool can open, next to a JSON manifest with what safetensors lacks: format version,
layout, the MeKi shape it belongs to, and sha256 checksums per block of rows. The reader maps the
file and reads rows on demand; it never reads the whole table (except `verify`).

We parse the safetensors header ourselves (8-byte little-endian length + JSON, per the published
spec) because the library exposes no byte offsets, and row-level memory mapping needs them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from romscale.errors import CheckpointError
from romscale.utils.atomic import atomic_write_bytes, atomic_write_json, read_json

TABLE_FILE = "rom_tables.safetensors"
MANIFEST_FILE = "rom_manifest.json"
FORMAT = "romscale.rom"
VERSION = 1
LAYOUT = "token-major [vocab, layers * d_mem]"
DTYPES = ("fp16", "bf16", "int8")
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
# numpy has no bfloat16: map the bytes as uint16 and reinterpret in torch.
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "I8": np.int8}
_ST_DTYPE = {"fp16": "F16", "bf16": "BF16", "int8": "I8"}


def pack_tables(tables: list[torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """[L x (V, d_mem)] float tables -> {"table": (V, L*d_mem)} (+ {"scales": (V, L)} for int8)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"ROM table dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    stacked = torch.stack([t.detach().float().cpu() for t in tables], dim=1)  # (V, L, d_mem)
    v, n_layers, d_mem = stacked.shape
    if dtype != "int8":
        return {"table": stacked.reshape(v, n_layers * d_mem).to(_TORCH[dtype]).contiguous()}
    # Symmetric int8 with one scale per (token row, layer): rows differ a lot in magnitude.
    scale = stacked.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # (V, L)
    scale16 = scale.to(torch.float16)
    q = torch.round(stacked / scale16.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"table": q.reshape(v, n_layers * d_mem).contiguous(), "scales": scale16.contiguous()}


def _block_hashes(raw: memoryview | bytes, row_bytes: int, block_rows: int) -> list[str]:
    step = row_bytes * block_rows
    return [hashlib.sha256(raw[i : i + step]).hexdigest() for i in range(0, len(raw), step)]


def write_table(
    out_dir: Path,
    tables: list[torch.Tensor],
    dtype: str,
    layers: list[int],
    meki: dict[str, Any],
    block_rows: int = 4096,
) -> dict[str, Any]:
    """Write TABLE_FILE and MANIFEST_FILE into `out_dir` (each atomically). Returns the manifest."""
    tensors = pack_tables(tables, dtype)
    blob = save(tensors, metadata={"format": FORMAT, "layout": LAYOUT})
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    data = memoryview(blob)[8 + header_len :]
    v, width = tensors["table"].shape
    entries = {}
    for name, t in tensors.items():
        start, stop = header[name]["data_offsets"]
        row_bytes = t.element_size() * (t.shape[1] if t.dim() == 2 else 1)
        entries[name] = {
            "dtype": header[name]["dtype"],
            "shape": list(t.shape),
            "data_offsets": [start, stop],
            "row_bytes": row_bytes,
            "block_sha256": _block_hashes(data[start:stop], row_bytes, block_rows),
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "layout": LAYOUT,
        "dtype": dtype,
        "vocab_size": v,
        "num_layers": len(layers),
        "d_mem": width // len(layers),
        "layers": layers,
        "meki": meki,
        "block_rows": block_rows,
        "file": TABLE_FILE,
        "file_bytes": len(blob),
        "header_bytes": 8 + header_len,
        "tensors": entries,
    }
    atomic_write_bytes(out_dir / TABLE_FILE, bytes(blob))
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    file = bundle_dir / MANIFEST_FILE
    m = read_json(file, CheckpointError, f"a romscale bundle holds {MANIFEST_FILE} and {TABLE_FILE}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a romscale ROM manifest (format {FORMAT!r} expected)")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{file}: unknown format version {m.get('version')!r}; this romscale reads version {VERSION}")
    required = ("dtype", "vocab_size", "num_layers", "d_mem", "layers", "block_rows", "file_bytes", "header_bytes", "tensors")
    missing = [k for k in required if k not in m]
    if missing or m["dtype"] not in DTYPES or "table" not in m["tensors"]:
        raise CheckpointError(f"{file} is incomplete or invalid (missing {missing or 'a valid dtype/table entry'})")
    return m


@dataclass
class _Mapped:
    array: np.ndarray
    torch_dtype: torch.dtype | None  # reinterpretation needed (bf16 stored as uint16)


class RomTable:
    """Read-only, memory-mapped access to a ROM table. Rows are read on demand."""

    def __init__(self, bundle_dir: str | Path) -> None:
        self.dir = Path(bundle_dir)
        self.manifest = m = read_manifest(self.dir)
        self.path = self.dir / TABLE_FILE
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is missing")
        size = self.path.stat().st_size
        if size != m["file_bytes"]:
            raise CheckpointError(f"{self.path} has {size} bytes, the manifest says {m['file_bytes']}: truncated or replaced")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        # Random access: don't let the kernel read ahead whole neighbourhoods of unrelated tokens.
        self._mmap.madvise(mmap.MADV_RANDOM)
        self._check_header()
        self.vocab_size, self.num_layers, self.d_mem = m["vocab_size"], m["num_layers"], m["d_mem"]
        self.dtype = m["dtype"]
        self._arrays = {name: self._map(name) for name in m["tensors"]}

    def _check_header(self) -> None:
        m = self.manifest
        (n,) = struct.unpack("<Q", self._mmap[:8])
        if 8 + n != m["header_bytes"]:
            raise CheckpointError(f"{self.path}: header length {8 + n} differs from the manifest's {m['header_bytes']}")
        try:
            header = json.loads(bytes(self._mmap[8 : 8 + n]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {exc}") from exc
        for name, e in m["tensors"].items():
            h = header.get(name)
            if h is None or h.get("dtype") != e["dtype"] or h.get("shape") != e["shape"] or h.get("data_offsets") != e["data_offsets"]:
                raise CheckpointError(f"{self.path}: tensor {name!r} in the file does not match the manifest ({h} vs {e})")
        t = m["tensors"]["table"]
        if t["shape"] != [m["vocab_size"], m["num_layers"] * m["d_mem"]] or t["dtype"] != _ST_DTYPE[m["dtype"]]:
            raise CheckpointError(f"{self.dir / MANIFEST_FILE}: table entry {t} contradicts vocab/layers/d_mem/dtype")
        if (m["dtype"] == "int8") != ("scales" in m["tensors"]):
            raise CheckpointError(f"{self.dir / MANIFEST_FILE}: int8 tables need a 'scales' tensor (and only they)")

    def _map(self, name: str) -> _Mapped:
        e = self.manifest["tensors"][name]
        start = self.manifest["header_bytes"] + e["data_offsets"][0]
        np_dtype = _NUMPY[e["dtype"]]
        arr = np.frombuffer(self._mmap, dtype=np_dtype, count=int(np.prod(e["shape"])), offset=start).reshape(e["shape"])
        return _Mapped(arr, torch.bfloat16 if e["dtype"] == "BF16" else None)

    @property
    def table_bytes(self) -> int:
        e = self.manifest["tensors"]["table"]
        return e["data_offsets"][1] - e["data_offsets"][0]

    @property
    def row_bytes(self) -> int:
        """Bytes read per token: its table row (+ its int8 scales)."""
        return sum(e["row_bytes"] for e in self.manifest["tensors"].values())

    def _take(self, name: str, flat_ids: np.ndarray) -> torch.Tensor:
        mapped = self._arrays[name]
        t = torch.from_numpy(mapped.array[flat_ids])  # fancy indexing copies just these rows
        return t.view(mapped.torch_dtype) if mapped.torch_dtype is not None else t

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All layers' expert vectors for `ids`: shape ids.shape + (num_layers, d_mem)."""
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise CheckpointError(f"token id out of range for the ROM table (vocab {self.vocab_size})")
        rows = self._take("table", flat).to(dtype).view(-1, self.num_layers, self.d_mem)
        if self.dtype == "int8":
            rows = rows * self._take("scales", flat).to(dtype).unsqueeze(-1)
        return rows.view(*ids.shape, self.num_layers, self.d_mem)

    def resident_bytes(self) -> int:
        """Bytes of the table file now in the page cache (mincore), for the memory benchmark."""
        from romscale.rom.pagecache import resident_bytes

        return resident_bytes(self._mmap)

    def verify(self) -> None:
        """Check every block checksum; raise CheckpointError naming the first bad block."""
        m = self.manifest
        base = m["header_bytes"]
        for name, e in m["tensors"].items():
            start, stop = e["data_offsets"]
            raw = memoryview(self._mmap)[base + start : base + stop]
            for i, (got, want) in enumerate(zip(_block_hashes(raw, e["row_bytes"], m["block_rows"]), e["block_sha256"])):
                if got != want:
                    first = i * m["block_rows"]
                    raise CheckpointError(
                        f"{self.path}: checksum mismatch in tensor {name!r}, rows {first}..{first + m['block_rows'] - 1} (block {i}): the file is corrupt"
                    )
            raw.release()

    def close(self) -> None:
        self._arrays = {}
        try:
            self._mmap.close()
        except BufferError:  # numpy views still alive; the mapping goes with them
            pass
        os.close(self._fd)
