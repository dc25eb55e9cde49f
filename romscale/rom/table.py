"""The ROM table file: all layers' folded MeKi tables packed token-major, [|V|, L x d_mem], so one
token's rows for every layer are one contiguous read. The other memories use the same format (one
table file per memory, keyed by memory type; romscale.rom.runtime): PLE and the fat embedding are
addressed by token id like MeKi, Engram by hashed n-gram id ("vocab_size" is then the number of
addressable rows, and "address" says which).

On disk it is a plain safetensors file (tensor "table", plus "scales" [|V|, L] fp16 for int8, plus
"row_crc32" [|V|]), which any safetensors tool can open, next to a JSON manifest with what
safetensors lacks: format version, layout, the MeKi shape it belongs to, and sha256 checksums per
block of rows. The reader maps the file and reads rows on demand; it never reads the whole table
(except `verify`). Every row is checked when it is read: its CRC-32 (table row, then its int8
scales) must match "row_crc32", whose own blocks are checked against the manifest when the table is
opened. Checking one token's row costs ~73 us here (benchmarks/row_verify_cost.py), next to ~72 ms per token.

We parse the safetensors header ourselves (8-byte little-endian length + JSON, per the published
spec) because the library exposes no byte offsets, and row-level memory mapping needs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from romscale.errors import CheckpointError, RomscaleError
from romscale.utils.outputs import member, read_json

TABLE_FILE = "rom_tables.safetensors"
MANIFEST_FILE = "rom_manifest.json"
FORMAT = "romscale.rom"
VERSION = 2
LAYOUT = "token-major [vocab, layers * d_mem]"
DTYPES = ("fp16", "bf16", "int8")
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
# numpy has no bfloat16: its bytes are mapped as uint16 (RomTable.rows_np widens them to fp32).
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "I8": np.int8, "I32": np.int32}
_ITEM = {"F16": 2, "BF16": 2, "I8": 1, "I32": 4}
_ST_DTYPE = {"fp16": "F16", "bf16": "BF16", "int8": "I8"}
FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16: an int8 scale must never round to zero


class TableRangeError(RomscaleError):
    """A value the ROM table's dtype cannot hold (NaN, Inf, fp16 overflow) at export."""


def _first_bad(stacked: torch.Tensor, bad: torch.Tensor, what: str, layers: list[int]) -> TableRangeError:
    row, slot = (int(x) for x in bad.nonzero()[0][:2])
    value = stacked[row, slot][bad[row, slot]][0].item() if bad.dim() == 3 else float("nan")
    return TableRangeError(f"MeKi table of layer {layers[slot]}, row (token id) {row}: {what} (e.g. {value!r})")


def pack_tables(tables: list[torch.Tensor], dtype: str, layers: list[int] | None = None, clamp: bool = False) -> dict[str, torch.Tensor]:
    """[L x (V, d_mem)] float tables -> {"table": (V, L*d_mem)} (+ {"scales": (V, L)} for int8).

    Values the dtype cannot hold are an error naming the layer and row: NaN always; Inf and fp16
    overflow unless `clamp`, which saturates them to the dtype's largest finite value."""
    if dtype not in DTYPES:
        raise RomscaleError(f"ROM table dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    stacked = torch.stack([t.detach().float().cpu() for t in tables], dim=1)  # (V, L, d_mem)
    layers = layers if layers is not None else list(range(stacked.shape[1]))
    v, n_layers, d_mem = stacked.shape
    nan = torch.isnan(stacked)
    if nan.any():
        raise _first_bad(stacked, nan, "NaN cannot be stored in any table dtype", layers)
    limit = FP16_MAX if dtype == "fp16" else float(torch.finfo(torch.float32).max) if dtype == "bf16" else FP16_MAX * 127
    # int8: the per-(row, layer) scale amax/127 is fp16, so |x| must stay under 127 * 65504.
    over = stacked.abs() > limit
    if over.any():
        if not clamp:
            raise _first_bad(stacked, over, f"beyond the range of {dtype} (|x| <= {limit:g}); pass --clamp (clamp=True) to saturate", layers)
        stacked = stacked.clamp(-limit, limit)
    if dtype != "int8":
        return {"table": stacked.reshape(v, n_layers * d_mem).to(_TORCH[dtype]).contiguous()}
    # Symmetric int8 with one scale per (token row, layer): rows differ a lot in magnitude.
    scale16 = (stacked.abs().amax(dim=-1) / 127.0).clamp(min=_FP16_TINY, max=FP16_MAX).to(torch.float16)  # (V, L)
    q = torch.round(stacked / scale16.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"table": q.reshape(v, n_layers * d_mem).contiguous(), "scales": scale16.contiguous()}


def row_crcs(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """CRC-32 of each token's bytes: its table row, then its scales row (int8)."""
    parts = [t.contiguous().view(torch.uint8).reshape(t.shape[0], -1).numpy()
             for t in (tensors["table"], tensors.get("scales")) if t is not None]
    out = np.empty(parts[0].shape[0], dtype=np.uint32)
    for i in range(out.size):
        c = 0
        for p in parts:
            c = zlib.crc32(p[i], c)
        out[i] = c
    return out.view(np.int32)  # safetensors has I32; the bits are what matter


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
    clamp: bool = False,
    *,
    memory: str = "meki",
    address: str = "token",
    table_file: str = TABLE_FILE,
    manifest_file: str = MANIFEST_FILE,
) -> dict[str, Any]:
    """Write `table_file` and `manifest_file` into `out_dir` (a folder the caller owns). Returns the
    manifest. `meki`: the memory's config, stored under the key `memory` (the memory type)."""
    if not isinstance(block_rows, int) or block_rows < 1:
        raise RomscaleError(f"block_rows must be a positive integer; got {block_rows!r}")
    tensors = pack_tables(tables, dtype, layers, clamp=clamp)
    tensors["row_crc32"] = torch.from_numpy(row_crcs(tensors))
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
        memory: meki,
        # The classic MeKi bundle's manifest stays as it was; every other table names its memory.
        **({} if (memory, table_file) == ("meki", TABLE_FILE) else {"memory": memory, "address": address}),
        "block_rows": block_rows,
        "file": table_file,
        "file_bytes": len(blob),
        "header_bytes": 8 + header_len,
        "tensors": entries,
    }
    (out_dir / table_file).write_bytes(blob)
    (out_dir / manifest_file).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _positive_int(m: dict, key: str, file: Path) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckpointError(f"{file}: '{key}' must be a positive integer; got {v!r}")
    return v


def read_manifest(bundle_dir: Path, manifest_file: str = MANIFEST_FILE) -> dict[str, Any]:
    """Parse and validate the ROM manifest's structure (types, counts, offsets); no file data read."""
    file = bundle_dir / manifest_file
    m = read_json(file, CheckpointError, f"a romscale bundle holds {manifest_file} and {TABLE_FILE if manifest_file == MANIFEST_FILE else 'its table file'}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a romscale ROM manifest (format {FORMAT!r} expected)")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{file}: unknown format version {m.get('version')!r}; this romscale reads version {VERSION} (re-export the bundle)")
    if m.get("dtype") not in DTYPES:
        raise CheckpointError(f"{file}: 'dtype' must be one of {', '.join(DTYPES)}; got {m.get('dtype')!r}")
    for key in ("vocab_size", "num_layers", "d_mem", "block_rows", "file_bytes", "header_bytes"):
        _positive_int(m, key, file)
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != m["num_layers"] or not all(isinstance(i, int) for i in layers):
        raise CheckpointError(f"{file}: 'layers' must list num_layers={m['num_layers']} layer indices")
    tensors = m.get("tensors")
    want = {"table", "row_crc32"} | ({"scales"} if m["dtype"] == "int8" else set())
    if not isinstance(tensors, dict) or set(tensors) != want:
        raise CheckpointError(f"{file}: 'tensors' must hold exactly {sorted(want)}; got {sorted(tensors) if isinstance(tensors, dict) else tensors!r}")
    v, width = m["vocab_size"], m["num_layers"] * m["d_mem"]
    shapes = {"table": [v, width], "scales": [v, m["num_layers"]], "row_crc32": [v]}
    dtypes = {"table": _ST_DTYPE[m["dtype"]], "scales": "F16", "row_crc32": "I32"}
    data_bytes = m["file_bytes"] - m["header_bytes"]
    for name, e in tensors.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"{file}: tensor entry {name!r} must be an object")
        if e.get("shape") != shapes[name] or e.get("dtype") != dtypes[name]:
            raise CheckpointError(f"{file}: tensor {name!r} must be {dtypes[name]} {shapes[name]} for vocab/layers/d_mem/dtype; got {e.get('dtype')} {e.get('shape')}")
        off = e.get("data_offsets")
        n_bytes = math.prod(shapes[name]) * _ITEM[dtypes[name]]
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(x, int) for x in off)
                and 0 <= off[0] and off[1] - off[0] == n_bytes and off[1] <= data_bytes):
            raise CheckpointError(f"{file}: tensor {name!r} data_offsets {off!r} do not span its {n_bytes:,} bytes inside the file")
        row_bytes = n_bytes // v
        if e.get("row_bytes") != row_bytes:
            raise CheckpointError(f"{file}: tensor {name!r} row_bytes must be {row_bytes}; got {e.get('row_bytes')!r}")
        hashes = e.get("block_sha256")
        n_blocks = -(-v // m["block_rows"])
        if not isinstance(hashes, list) or len(hashes) != n_blocks or not all(isinstance(h, str) for h in hashes):
            got = len(hashes) if isinstance(hashes, list) else hashes
            raise CheckpointError(f"{file}: tensor {name!r} needs {n_blocks} block checksums ({v} rows / {m['block_rows']} per block); got {got!r}")
    return m


@dataclass
class _Mapped:
    array: np.ndarray  # bf16 is mapped as uint16 (numpy has no bfloat16)
    raw: memoryview  # the tensor's bytes, for row checksums


class RomTable:
    """Read-only, memory-mapped access to a ROM table. Rows are read on demand and verified."""

    def __init__(self, bundle_dir: str | Path, verify_rows: bool = True, manifest_file: str = MANIFEST_FILE) -> None:
        self.dir = Path(bundle_dir)
        self.manifest = m = read_manifest(self.dir, manifest_file)
        self.path = member(self.dir, m.get("file"), CheckpointError, str(self.dir / manifest_file))
        size = self.path.stat().st_size
        if size != m["file_bytes"]:
            raise CheckpointError(f"{self.path} has {size:,} bytes, the manifest says {m['file_bytes']:,}: truncated or replaced")
        self.verify_rows = verify_rows
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        # Random access: don't let the kernel read ahead whole neighbourhoods of unrelated tokens.
        self._mmap.madvise(mmap.MADV_RANDOM)
        self._arrays: dict[str, _Mapped] = {}
        try:
            self._check_header()
            self.vocab_size, self.num_layers, self.d_mem = m["vocab_size"], m["num_layers"], m["d_mem"]
            self.dtype = m["dtype"]
            self._arrays = {name: self._map(name) for name in m["tensors"]}
            self._check_blocks("row_crc32")  # small; every row check relies on it
            self._crc = self._arrays["row_crc32"].array.view(np.uint32).copy()
        except BaseException:
            self.close()
            raise

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
            h = header.get(name) if isinstance(header, dict) else None
            if not isinstance(h, dict) or h.get("dtype") != e["dtype"] or h.get("shape") != e["shape"] or h.get("data_offsets") != e["data_offsets"]:
                raise CheckpointError(f"{self.path}: tensor {name!r} in the file does not match the manifest ({h} vs {e})")

    def _map(self, name: str) -> _Mapped:
        e = self.manifest["tensors"][name]
        start = self._start(name)
        stop = self.manifest["header_bytes"] + e["data_offsets"][1]
        arr = np.frombuffer(self._mmap, dtype=_NUMPY[e["dtype"]], count=math.prod(e["shape"]), offset=start).reshape(e["shape"])
        return _Mapped(arr, memoryview(self._mmap)[start:stop])

    @property
    def table_bytes(self) -> int:
        e = self.manifest["tensors"]["table"]
        return e["data_offsets"][1] - e["data_offsets"][0]

    @property
    def row_bytes(self) -> int:
        """Bytes read per token: its table row (+ its int8 scales, + its 4-byte checksum)."""
        return sum(e["row_bytes"] for e in self.manifest["tensors"].values())

    def _start(self, name: str) -> int:
        return self.manifest["header_bytes"] + self.manifest["tensors"][name]["data_offsets"][0]

    def _prefetch(self, ids: list[int]) -> None:
        """Ask the kernel for every page of these rows at once (MADV_WILLNEED) before touching them.
        Under MADV_RANDOM a 4,324-byte row spanning two pages is otherwise two faults, two reads one
        after the other: a cold row took 149 us with the advice against 214 us without, a 16-token
        prompt 0.50 ms against 2.26 ms (2-core AMD EPYC, benchmarks/row_read_cost.py; this disk's
        latency varies between runs, the ratio holds)."""
        for name in ("table", "scales"):
            if name not in self._arrays:
                continue
            rb, start = self.manifest["tensors"][name]["row_bytes"], self._start(name)
            for i in ids:
                a = start + i * rb
                page = a - a % mmap.PAGESIZE
                self._mmap.madvise(mmap.MADV_WILLNEED, page, a + rb - page)

    def _check_rows(self, ids: Iterable[int]) -> None:
        """Each row's CRC-32 (table row, then its int8 scales) against "row_crc32"; `ids` distinct."""
        table = self._arrays["table"].raw
        rb = self.manifest["tensors"]["table"]["row_bytes"]
        scales = self._arrays["scales"].raw if "scales" in self._arrays else None
        sb = self.manifest["tensors"]["scales"]["row_bytes"] if scales is not None else 0
        for i in ids:
            c = zlib.crc32(table[i * rb : (i + 1) * rb])
            if scales is not None:
                c = zlib.crc32(scales[i * sb : (i + 1) * sb], c)
            if c != self._crc[i]:
                raise CheckpointError(f"{self.path}: row {i} (token id {i}) fails its checksum: the table file is corrupt")

    def rows_np(self, ids: np.ndarray) -> np.ndarray:
        """All layers' expert vectors for `ids` as float32: shape ids.shape + (num_layers, d_mem).
        numpy only: a native host's per-token read (romscale.rom.ort_runtime) pays no torch op
        overhead (17 us for a warm row here; `rows` wraps it for torch)."""
        flat = np.asarray(ids).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = int(flat[(flat < 0) | (flat >= self.vocab_size)][0])
            raise CheckpointError(f"token id {bad} is out of range for the ROM table {self.path} (vocabulary {self.vocab_size})")
        distinct = np.unique(flat).tolist()
        self._prefetch(distinct)
        if self.verify_rows:
            self._check_rows(distinct)
        raw = self._arrays["table"].array[flat]  # fancy indexing copies just these rows
        rows = ((raw.astype(np.uint32) << 16).view(np.float32) if self.dtype == "bf16"  # bf16: the top half of an fp32
                else raw.astype(np.float32)).reshape(-1, self.num_layers, self.d_mem)
        if self.dtype == "int8":
            rows *= self._arrays["scales"].array[flat].astype(np.float32)[..., None]
        if self.verify_rows and not np.isfinite(rows).all():
            bad = int(flat[(~np.isfinite(rows)).reshape(len(flat), -1).any(1).nonzero()[0][0]])
            raise CheckpointError(f"{self.path}: row {bad} (token id {bad}) holds NaN/Inf values (its int8 scales?): the table is corrupt")
        return rows.reshape(*np.shape(ids), self.num_layers, self.d_mem)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All layers' expert vectors for `ids`: shape ids.shape + (num_layers, d_mem)."""
        return torch.from_numpy(self.rows_np(ids.cpu().numpy())).to(dtype)

    def drop_cache(self) -> None:
        """Make every row cold again, as after a reboot: unmap this reader's pages of the file
        (MADV_DONTNEED; on a read-only file mapping it only drops the page-table entries, and the next
        read faults the page in again), then ask the kernel to drop the file's cached pages. The
        second step alone skips every page this reader has touched, since mapped pages cannot be
        evicted: a benchmark that only dropped the file's cache between runs of an open reader timed
        warm rows after its first run (found in session 13). Worse for a table written moments ago:
        the page cache holds it in large folios, and each row read pins its whole folio (the 45x
        residency of session 12)."""
        from romscale.rom.pagecache import drop_file_cache

        self._mmap.madvise(mmap.MADV_DONTNEED)
        drop_file_cache(self.path)

    def resident_bytes(self) -> int:
        """Bytes of the table file now in the page cache (mincore), for the memory benchmark."""
        from romscale.rom.pagecache import resident_bytes

        return resident_bytes(self._mmap)

    def _check_blocks(self, name: str) -> int:
        m = self.manifest
        e = m["tensors"][name]
        hashes = _block_hashes(self._arrays[name].raw, e["row_bytes"], m["block_rows"])
        if len(hashes) != len(e["block_sha256"]):  # read_manifest checks the count; never zip past a gap
            raise CheckpointError(f"{self.path}: tensor {name!r} has {len(hashes)} blocks, the manifest lists {len(e['block_sha256'])}")
        for i, (got, want) in enumerate(zip(hashes, e["block_sha256"])):
            if got != want:
                first = i * m["block_rows"]
                last = min(first + m["block_rows"], m["vocab_size"]) - 1
                raise CheckpointError(f"{self.path}: checksum mismatch in tensor {name!r}, rows {first}..{last} (block {i}): the file is corrupt")
        return len(hashes)

    def verify(self) -> int:
        """Check every block checksum of every tensor and every row checksum; returns the number of
        blocks checked. Raises CheckpointError naming the first bad block or row."""
        blocks = sum(self._check_blocks(name) for name in self.manifest["tensors"])
        self._check_rows(range(self.vocab_size))
        return blocks

    def close(self) -> None:
        arrays, self._arrays = self._arrays, {}
        while arrays:  # popped, not iterated: a loop variable would keep the last view (and the mapping) alive
            arrays.popitem()[1].raw.release()
        try:
            self._mmap.close()
        except BufferError:  # numpy views handed out are still alive; the mapping goes with them
            pass
        if self._fd >= 0:  # a second close() is a no-op
            os.close(self._fd)
            self._fd = -1
