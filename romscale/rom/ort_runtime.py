"""The host side of the native runtime: an ONNX Runtime session of a native export
(romscale.rom.onnx_export) plus, for MeKi, the bundle's ROM table read from storage.

Per step the host knows the new token ids first (the prompt, or the token just sampled), reads
exactly their rows from the mmap'd table (each row checked against its CRC as it is read,
romscale.rom.table; numpy only, no torch op per step), and runs the program once. There is nothing
to overlap the read with: the program's first layer needs the rows, and the id is known only when
the previous step ended. A row is one contiguous read of layers x d_mem values (4,320 bytes + a
4-byte CRC at SmolLM2 d_mem 72, fp16); the reader asks for all of its pages at once
(MADV_WILLNEED), so a cold row is one storage read, not one per page, and the page cache serves it
after its first touch. The KV cache stays in ONNX Runtime's own buffers between steps (I/O
binding), never copied through numpy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from romscale.errors import RomscaleError
from romscale.rom.onnx_export import PROGRAM_FILE, read_native

__all__ = ["GenerationResult", "OrtDecoder"]


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, new] generated ids (after the prompt)
    ttft_s: float  # prefill + the first token
    decode_s: float  # the remaining new tokens
    steps: int
    row_bytes_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class OrtDecoder:
    """Prefill + KV-cached decode of a native export on ONNX Runtime's CPU provider."""

    def __init__(self, folder: str | Path, *, threads: int = 2, verify_rows: bool = True,
                 bundle: str | Path | None = None, spin: bool = True) -> None:
        """`bundle`: where the MeKi table is now (default: where it was at export); its table must be
        the one exported against (the sha256 in its manifest is compared). `spin=False`: idle worker
        threads sleep at once instead of spinning (for decoders that take turns on the same cores)."""
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = read_native(self.folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # ORT's idle intra-op threads spin for a while after a run: two sessions taking turns
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # would starve each other
        self.session = ort.InferenceSession(str(self.folder / PROGRAM_FILE), opts, providers=["CPUExecutionProvider"])
        # batch-1 decode steps run the static decode program (romscale.rom.onnx_export: its shape
        # arithmetic folded away); prefill and batched steps the general one
        decode = self.meta.get("decode_program")
        self.decode_session = (ort.InferenceSession(str(self.folder / decode), opts, providers=["CPUExecutionProvider"])
                               if decode else None)
        self.table = None
        self.tables: dict[str, Any] = {}  # a memory bundle's: input name -> ROM table
        if self.meta["rows"] is not None:
            self.table = self._open_table(verify_rows, bundle)
        if self.meta.get("memories"):
            self.tables = self._open_memory_tables(verify_rows, bundle)
        self.row_bytes_read = 0

    def _open_memory_tables(self, verify_rows: bool, bundle: str | Path | None) -> dict[str, Any]:
        """Each memory's ROM table of the memory bundle, checked to be the table exported against."""
        from romscale.meki.io import MEMORY_BUNDLE_KIND
        from romscale.rom.table import RomTable
        from romscale.utils.outputs import read_manifest

        path = Path(bundle) if bundle is not None else Path((self.meta.get("bundle") or {}).get("path", ""))
        files = read_manifest(path, MEMORY_BUNDLE_KIND, RomscaleError, hash_files=False)["files"]
        tables: dict[str, Any] = {}
        try:
            for e in self.meta["memories"]:
                if files.get(e["table"], {}).get("sha256") != e["table_sha256"]:
                    raise RomscaleError(f"{self.folder}: was exported for another {e['name']} table than the one now in {path} "
                                        "(sha256 differs)")
                t = tables[e["input"]] = RomTable(path, verify_rows=verify_rows, manifest_file=e["manifest"])
                if (t.manifest["d_mem"], t.manifest["num_layers"]) != (e["width"], e["layers"]):
                    raise RomscaleError(f"{path}: the {e['name']} table's rows ({t.manifest['num_layers']} x {t.manifest['d_mem']}) "
                                        f"do not match the export's ({e['layers']} x {e['width']})")
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        return tables

    def _open_table(self, verify_rows: bool, bundle: str | Path | None):
        from romscale.meki.io import BUNDLE_KIND
        from romscale.rom.table import RomTable
        from romscale.utils.outputs import read_manifest

        b = self.meta.get("bundle") or {}
        path = Path(bundle) if bundle is not None else Path(b.get("path", ""))
        files = read_manifest(path, BUNDLE_KIND, RomscaleError, hash_files=False)["files"]
        if files.get(b.get("table"), {}).get("sha256") != b.get("table_sha256"):
            raise RomscaleError(f"{self.folder}: was exported for another ROM table than the one now in {path} (sha256 differs)")
        table = RomTable(path, verify_rows=verify_rows)
        m, r = table.manifest, self.meta["rows"]
        if (m["d_mem"], m["num_layers"]) != (r["d_mem"], r["layers"]):
            table.close()
            raise RomscaleError(f"{path}: table of d_mem {m['d_mem']} does not match the export's rows {r}")
        return table

    @property
    def vocab(self) -> int:
        return int(self.meta["vocab"])

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        for t in self.tables.values():
            t.close()
        self.tables = {}

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = self.table.rows_np(ids)  # [B, T, layers, d_mem] float32, CRC-checked
        self.row_bytes_read += ids.size * self.table.row_bytes
        return rows.reshape(ids.shape[0], ids.shape[1], -1)

    def _empty_cache(self, batch: int):
        import onnxruntime as ort

        m = self.meta
        z = np.zeros((m["layers"], batch, m["kv_heads"], 0, m["head_dim"]), np.float32)
        return ort.OrtValue.ortvalue_from_numpy(z), ort.OrtValue.ortvalue_from_numpy(z.copy())

    def _run(self, ids: np.ndarray, mask: np.ndarray, past) -> tuple[np.ndarray, Any]:
        t = ids.shape[1]
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -t:]
        session = self.decode_session if self.decode_session is not None and ids.shape == (1, 1) else self.session
        io = session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        io.bind_ortvalue_input("past_k", past[0])
        io.bind_ortvalue_input("past_v", past[1])
        if self.table is not None:
            io.bind_cpu_input("rows", self._rows(ids))
        for name, table in self.tables.items():
            rows = table.rows_np(ids)  # [B, T, layers, width] float32, CRC-checked
            self.row_bytes_read += ids.size * table.row_bytes
            io.bind_cpu_input(name, rows.reshape(ids.shape[0], ids.shape[1], -1))
        for name in ("logits", "present_k", "present_v"):
            io.bind_output(name, "cpu")
        session.run_with_iobinding(io)
        logits, k, v = io.get_outputs()
        return logits.numpy(), (k, v)

    def greedy_steps(self, ids: np.ndarray, max_new_tokens: int) -> Iterator[tuple[int, float]]:
        """Greedy decode of one prompt [1, T], one step per `next()`: yields (token, seconds of the
        step that produced it); the first item is the prefill's. A benchmark interleaves two decoders'
        steps through this (lockstep), so both see the same machine state at every token."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise RomscaleError(f"greedy_steps takes one prompt of shape (1, tokens >= 1); got {ids.shape}")
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        logits, past = self._run(ids, mask, self._empty_cache(1))
        nxt = _pick(logits, False, 1.0, 1.0, None)
        yield int(nxt[0]), time.perf_counter() - t0
        for _ in range(max_new_tokens - 1):
            t0 = time.perf_counter()
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            logits, past = self._run(nxt[:, None], mask, past)
            nxt = _pick(logits, False, 1.0, 1.0, None)
            yield int(nxt[0]), time.perf_counter() - t0

    def generate(self, ids: np.ndarray, attention_mask: np.ndarray | None = None, *, max_new_tokens: int = 32,
                 sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos: Sequence[int] = (), on_token: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
        """Greedy (or sampled) continuation of left-padded `ids` [B, T]. Stops after max_new_tokens,
        or when every row has produced one of `eos` (rows that finished keep emitting eos[0])."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RomscaleError(f"prompt ids must have shape (batch, tokens >= 1); got {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise RomscaleError(f"token id {int(ids.max())} is out of range for this model's vocabulary of {self.vocab}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        rng = np.random.default_rng(seed)
        eos_set = set(int(e) for e in eos)
        done = np.zeros(ids.shape[0], bool)
        out: list[np.ndarray] = []
        self.row_bytes_read = 0
        t0 = time.perf_counter()
        logits, past = self._run(ids, mask, self._empty_cache(ids.shape[0]))
        ttft = decode_start = 0.0
        for i in range(max_new_tokens):
            nxt = _pick(logits, sample, temperature, top_p, rng)
            if eos_set:
                nxt = np.where(done, next(iter(eos)), nxt)
                done |= np.isin(nxt, list(eos_set))
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if i == 0:
                ttft = time.perf_counter() - t0
                decode_start = time.perf_counter()
            if i == max_new_tokens - 1 or (eos_set and done.all()):
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
            logits, past = self._run(nxt[:, None], mask, past)
        return GenerationResult(np.stack(out, 1), ttft, time.perf_counter() - decode_start, len(out), self.row_bytes_read)


def _pick(logits: np.ndarray, sample: bool, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    if not sample:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    picks = []
    for row in p:  # nucleus: the smallest set of most likely tokens holding top_p of the mass
        order = np.argsort(-row)
        keep = order[: int(np.searchsorted(np.cumsum(row[order]), top_p) + 1)]
        q = row[keep] / row[keep].sum()
        picks.append(keep[rng.choice(len(keep), p=q)])
    return np.asarray(picks, np.int64)
