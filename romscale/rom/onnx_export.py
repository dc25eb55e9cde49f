"""Export a deploy bundle's RAM part to an ONNX program for ONNX Runtime (the native runtime).

The program is one step of a KV-cached decoder, used for prefill (T prompt tokens) and for decode
(T = 1); a second program, the same step traced with batch 1 and one token (only the past length
dynamic), serves batch-1 decode:

    inputs   input_ids [B, T] int64, attention_mask [B, P + T] int64, position_ids [B, T] int64,
             past_k / past_v [layers, B, kv_heads, P, head_dim] float32,
             rows [B, T, memory layers x d_mem] float32 (MeKi bundles only: the current tokens' ROM rows)
    outputs  logits [B, vocab] (last position), present_k / present_v [layers, B, kv_heads, P + T, head_dim]

The MeKi table is never inside the program: the host reads the rows of each token from the
bundle's table on storage (romscale.rom.ort_runtime) and passes them in. The model's own forward
runs under the trace, so every family, position and fusion the PyTorch bundle supports exports.
MeKi on the FFN (parallel_ffn) is traced in the fused deploy layout (romscale.rom.onnx_fused: one
MatMul for the FFN's and the branch's gates, a few ops per layer more than the dense model); the
other placements in their hook form, the rows handed to the hooks as an input.

Why a second, static decode program: with dynamic batch and token axes the trace keeps the shape
arithmetic of every view (ONNX Runtime's optimised dense SmolLM2 graph: 3,450 nodes, ~1,900 of them
Shape / Gather / Unsqueeze / Concat / Reshape, about as much profiled time per step as the
MatMuls); with those axes fixed it folds to 1,462 nodes, and a batch-1 decode step ran 1.12-1.18x
faster (measured on the 2-core development CPU, same session, interleaved). The two programs keep
their weights in one file (`weights.bin`, external data), so the disk holds them once.

Why the TorchScript exporter (`dynamo=False`): it traces the HF model with its Python cache
objects in seconds; the dynamo exporter gave the same program (checked on a tiny Llama) but spent
~20 CPU-seconds on a 2-layer model in decompositions, which the tests and the main job cannot
afford. Weights: fp32; int8 weight-only through ONNX Runtime's own MatMulNBits quantiser (8 bits,
symmetric, blocks of 32 along the input dimension; per-channel scales are the block-size = K
case, which MatMulNBits does not offer for K = 576) with accuracy_level 4: activations quantised
to int8 per block and integer dot products (VNNI), llama.cpp's q8_0 scheme. Why: with float compute
(accuracy_level unset) ONNX Runtime 1.32 de-quantised the 8-bit weights at every step, 4.8 tok/s
on SmolLM2-135M against 88.2 with level 4 (session 7's Xeon, 2 threads, 64 tokens:
results/native_decode_cpu_int8.json and docs/native_runtime.md); fp16 through
ONNX Runtime's float16 converter (inputs and outputs stay float32).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.attach import meki_branches, meki_state
from romscale.rom.onnx_fused import SlotRows, fused_mlps

__all__ = ["NATIVE_KIND", "NATIVE_FILE", "PROGRAM_FILE", "DECODE_FILE", "WEIGHTS", "export_native", "export_native_from", "native_cache_for", "read_native"]

NATIVE_KIND = "onnx-program"
NATIVE_FILE = "native.json"
PROGRAM_FILE = "model.onnx"
DECODE_FILE = "decode.onnx"  # batch 1, one token: the static decode program
WEIGHTS_FILE = "weights.bin"  # both programs' weights (ONNX external data)
WEIGHTS = ("fp32", "fp16", "int8")
OPSET = 18
LAYOUT = "fused3"  # the export's layout version: fused MeKi FFN matmuls, a static decode program, shared weights,
# int8 MatMulNBits with int8 compute (fused2: the same with float compute)


class _Step(nn.Module):
    """The traced step: the HF model with a cache rebuilt from tensors and the ROM rows as an input."""

    def __init__(self, model: nn.Module, layers: int, rows_shape: tuple[int, int] | None,
                 memories: list[tuple[Any, int, int]] = ()) -> None:
        super().__init__()
        self.model, self.layers, self.rows_shape, self.memories = model, layers, rows_shape, list(memories)
        self.state = meki_state(model) if not self.memories else None
        self.slot_rows = SlotRows(rows_shape[1]) if rows_shape is not None else None

    def forward(self, input_ids, attention_mask, position_ids, past_k, past_v, rows=None, *more_rows):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past_k[i], past_v[i], i)
        if self.memories:  # a memory bundle: one rows input per memory, handed to it as its ROM table's rows
            b, t = input_ids.shape
            for (mem, n_layers, width), r in zip(self.memories, (rows, *more_rows)):
                mem.set_row_source(self.model, lambda _ids, r=r.view(b, t, n_layers, width): r)
        elif self.state is not None:
            b, t = input_ids.shape
            r = rows.view(b, t, *self.rows_shape)
            self.state.row_source = lambda _ids: r  # for the hook-form branches
            self.slot_rows.set(rows)  # for the fused MLPs (the trace drops whichever is unused)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = out.past_key_values
        ks = torch.stack([kv.layers[i].keys for i in range(self.layers)])
        vs = torch.stack([kv.layers[i].values for i in range(self.layers)])
        return out.logits[:, -1], ks, vs


def _shape(model: nn.Module) -> dict[str, int]:
    c = model.config
    heads = c.num_attention_heads
    return {"layers": c.num_hidden_layers, "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads, "vocab": c.vocab_size}


def export_native(model: nn.Module, out: str | Path, *, weights: str = "fp32", bundle: str | Path | None = None,
                  tokenizer: Any = None, overwrite: bool = False,
                  inputs: Iterable[str | Path] = (), fused: bool = True) -> Path:
    """Write the ONNX program of `model` (a dense HF model, or a MeKi bundle's model with external
    tables) to the new romscale folder `out`. `bundle`: the bundle whose table feeds the rows
    (recorded, with its table's hash, so the runtime opens the same table). `fused=False` traces
    every MeKi branch in its hook form (the tests' reference for the fused layout)."""
    if weights not in WEIGHTS:
        raise RomscaleError(f"--weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    memories = _token_memories(model)
    if memories:
        return _export_memories(model, out, memories, weights=weights, bundle=bundle, tokenizer=tokenizer,
                                overwrite=overwrite, inputs=inputs)
    state = meki_state(model)
    if state is not None and not state.external:
        raise RomscaleError("the native export takes a deploy bundle's model (its MeKi table on storage): export a bundle first")
    if state is not None and bundle is None:
        raise RomscaleError("a MeKi model's native export needs the bundle its rows come from")
    shape = _shape(model)
    rows_shape = (len(meki_branches(model)), state.cfg.d_mem) if state is not None else None
    meta: dict[str, Any] = {"format": NATIVE_KIND, "version": 1, "layout": LAYOUT, "opset": OPSET, "weights": weights, **shape,
                            "rows": None if rows_shape is None else {"layers": rows_shape[0], "d_mem": rows_shape[1],
                                                                    "width": rows_shape[0] * rows_shape[1]}}
    if bundle is not None:
        from romscale.meki.io import BUNDLE_KIND
        from romscale.rom.table import TABLE_FILE
        from romscale.utils.outputs import read_manifest

        files = read_manifest(bundle, BUNDLE_KIND, RomscaleError, hash_files=False)["files"]
        meta["bundle"] = {"path": str(Path(bundle).absolute()), "table": TABLE_FILE, "table_sha256": files[TABLE_FILE]["sha256"]}
    _write_export(model, out, meta, shape, rows_shape, fused, weights=weights, tokenizer=tokenizer, overwrite=overwrite,
                  inputs=[*inputs, *([bundle] if bundle else [])])
    return Path(out)


def _write_export(model: nn.Module, out: str | Path, meta: dict[str, Any], shape: dict[str, int],
                  rows_shape: tuple[int, int] | None, fused: bool, *, weights: str, tokenizer: Any, overwrite: bool,
                  inputs: Iterable[str | Path], memories: list[tuple[Any, int, int]] = (),
                  extra_rows: list[tuple[str, int]] = ()) -> None:
    """The export folder of every kind of model: both programs traced (the general one, then the
    static decode one), converted to `weights`, their weights shared in WEIGHTS_FILE, native.json."""
    from romscale.utils.outputs import output_dir

    with output_dir(out, kind=NATIVE_KIND, inputs=inputs, overwrite=overwrite, meta={"weights": weights}) as o:
        t0 = time.perf_counter()
        for prog, decode in ((PROGRAM_FILE, False), (DECODE_FILE, True)):
            n_fused = _trace(model, o.path / prog, shape, rows_shape, fused, decode=decode, memories=memories, extra_rows=extra_rows)
            if not decode:
                meta["fused_layers"] = n_fused
            if weights != "fp32":
                _convert(o.path / prog, weights)
        meta["shared_weights"] = _share_weights(o.path, [PROGRAM_FILE, DECODE_FILE])
        meta["decode_program"] = DECODE_FILE
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(o.path))
        (o.path / NATIVE_FILE).write_text(json.dumps(meta, indent=1))


def _token_memories(model: nn.Module) -> list[tuple[Any, int, int]]:
    """(memory, layers, width) of each memory of a memory bundle's model (PLE, the fat embedding,
    MeKi among others), or [] for a dense model or a MeKi bundle's (which has its own layout)."""
    from romscale.memories.base import attached_memories

    mems = attached_memories(model)
    if not mems or [m.name for m in mems] == ["meki"]:
        return []
    out = []
    for m in mems:
        if m.address != "token":
            # Engram's rows are addressed by hashed n-grams of the previous tokens: the host would have
            # to hash them; not exported so far
            raise RomscaleError(f"the native export takes memories whose rows are addressed by token ids; {m.label or m.name}'s "
                                f"are addressed by {m.address} ids")
        state = m.state(model)
        if not getattr(state, "external", False):
            raise RomscaleError("the native export takes a memory bundle's model (its tables on storage): export a bundle first")
        _, width, layers = m.row_layout(model)
        out.append((m, len(layers), width))
    return out


def _export_memories(model: nn.Module, out: str | Path, memories: list[tuple[Any, int, int]], *, weights: str,
                     bundle: str | Path | None, tokenizer: Any, overwrite: bool, inputs: Iterable[str | Path]) -> Path:
    """The native export of a memory bundle's model: one `rows_<memory>` input [B, T, layers x width]
    per memory, read by the host from that memory's ROM table (native.json `memories`)."""
    from romscale.meki.io import MEMORY_BUNDLE_KIND
    from romscale.rom.runtime import memory_table_files
    from romscale.utils.outputs import read_manifest

    if bundle is None:
        raise RomscaleError("a memory model's native export needs the memory bundle its rows come from")
    files = read_manifest(bundle, MEMORY_BUNDLE_KIND, RomscaleError, hash_files=False)["files"]
    shape = _shape(model)
    entries = []
    for mem, n_layers, width in memories:
        table_file, manifest_file = memory_table_files(mem.name)
        entries.append({"name": mem.name, "input": f"rows_{mem.name}", "layers": n_layers, "width": width,
                        "table": table_file, "manifest": manifest_file, "table_sha256": files[table_file]["sha256"]})
    meta: dict[str, Any] = {"format": NATIVE_KIND, "version": 1, "layout": LAYOUT, "opset": OPSET, "weights": weights, **shape,
                            "rows": None, "memories": entries,
                            "bundle": {"path": str(Path(bundle).absolute()), "kind": MEMORY_BUNDLE_KIND}}
    extra = [(e["input"], e["layers"] * e["width"]) for e in entries]
    saved = [(mem, mem.state(model).row_source) for mem, _, _ in memories]
    try:
        _write_export(model, out, meta, shape, None, False, weights=weights, tokenizer=tokenizer, overwrite=overwrite,
                      inputs=[*inputs, bundle], memories=memories, extra_rows=extra)
    finally:  # the caller's model reads its own tables again, no traced tensor stays behind
        for mem, source in saved:
            mem.state(model).row_source = source
    return Path(out)


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm (nn.RMSNorm, in MeKi's branch) in ONNX ops: the TorchScript exporter has no
    symbolic for it below opset 23. ONNX Runtime fuses this pattern into one SimplifiedLayerNormalization
    op only when the square is a Pow (checked on its optimised graph; with Mul(x, x) six ops stayed)."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    e = sh._maybe_get_const(eps, "f")
    e = float(e) if isinstance(e, float) else 1.1920928955078125e-07  # eps=None: torch uses finfo(float32).eps
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.long))
    ms = g.op("ReduceMean", g.op("Pow", x, g.op("Constant", value_t=torch.tensor(2.0))), axes, keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.op("Constant", value_t=torch.tensor(e)))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _trace(model: nn.Module, path: Path, shape: dict[str, int], rows_shape: tuple[int, int] | None,
           fused: bool, decode: bool = False, memories: list[tuple[Any, int, int]] = (),
           extra_rows: list[tuple[str, int]] = ()) -> int:
    """Export the step of `model` to `path`; returns the number of MeKi layers in the fused layout.
    `decode`: batch 1 and one token, fixed (only the past length stays dynamic)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
    model = model.eval().float()
    step = _Step(model, shape["layers"], rows_shape, memories)
    b, t, p = (1, 1, 2) if decode else (1, 3, 2)  # example sizes; the dynamic axes are declared below
    kv = torch.zeros(shape["layers"], b, shape["kv_heads"], p, shape["head_dim"])
    args = [torch.ones(b, t, dtype=torch.long), torch.ones(b, p + t, dtype=torch.long),
            torch.arange(p, p + t).unsqueeze(0), kv, kv.clone()]
    names = ["input_ids", "attention_mask", "position_ids", "past_k", "past_v"]
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "tokens"}, "past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
            "logits": {0: "batch"}, "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}}
    if rows_shape is not None:
        args.append(torch.zeros(b, t, rows_shape[0] * rows_shape[1]))
        names.append("rows")
        axes["rows"] = {0: "batch", 1: "tokens"}
    for name, width in extra_rows:  # a memory bundle's: one input per memory
        args.append(torch.zeros(b, t, width))
        names.append(name)
        axes[name] = {0: "batch", 1: "tokens"}
    if decode:  # keep only the length axes
        axes = {k: {d: n for d, n in v.items() if n in ("past", "total")} for k, v in axes.items()}
        axes = {k: v for k, v in axes.items() if v}
    state = meki_state(model) if not memories else None
    saved = (state.row_source, state.rows, state.ids) if state is not None else None
    try:
        with torch.no_grad(), warnings.catch_warnings(), fused_mlps(model, step.slot_rows, enabled=fused) as n_fused:
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values it bakes in
            torch.onnx.export(step, tuple(args), str(path), dynamo=False, input_names=names,
                              output_names=["logits", "present_k", "present_v"], dynamic_axes=axes, opset_version=OPSET)
    finally:
        if state is not None:  # no traced tensor stays behind in the caller's model
            state.row_source, state.rows, state.ids = saved
    return n_fused


def _share_weights(folder: Path, programs: list[str]) -> dict[str, Any]:
    """Move the first program's large tensors to WEIGHTS_FILE (ONNX external data) and point every
    other program's identical tensors (same bytes, type and shape: the traces name them
    differently) at the same bytes there. Returns counts for native.json."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    def key(t, raw: bytes) -> tuple:
        return hashlib.sha256(raw).digest(), t.data_type, tuple(t.dims)

    first = folder / programs[0]
    onnx.save_model(onnx.load(str(first)), str(first), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS_FILE, size_threshold=1024)
    index: dict[tuple, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "rb") as f:
        for t in onnx.load(str(first), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                off, n = int(info.get("offset", 0)), int(info["length"])
                f.seek(off)
                index[key(t, f.read(n))] = (off, n)
    shared = inline = 0
    for name in programs[1:]:
        proto = onnx.load(str(folder / name))
        for t in proto.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < 1024:
                continue  # small constants stay in the graph, as in the first program
            hit = index.get(key(t, t.raw_data))
            if hit is None:  # a large tensor only this program has (a constant of its fixed shapes)
                inline += 1
                continue
            set_external_data(t, location=WEIGHTS_FILE, offset=hit[0], length=hit[1])
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            shared += 1
        onnx.save_model(proto, str(folder / name))
    return {"file": WEIGHTS_FILE, "tensors": len(index), "shared_by_decode": shared, "inline_in_decode": inline}


def _convert(path: Path, weights: str) -> None:
    import onnx

    proto = onnx.load(str(path))
    if weights == "int8":
        import logging

        # The quantiser's module calls logging.basicConfig(level=INFO) on import and logs a line
        # per graph node: keep the caller's root logger as it was, and the module quiet.
        root = logging.getLogger()
        handlers, root_level = list(root.handlers), root.level
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        root.handlers[:], root.level = handlers, root_level
        log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = log.level
        log.setLevel(logging.WARNING)
        try:
            q = MatMulNBitsQuantizer(proto, bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
            q.process()
        finally:
            log.setLevel(level)
        proto = q.model.model
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(proto, keep_io_types=True)
    onnx.save(proto, str(path))


def read_native(folder: str | Path) -> dict[str, Any]:
    """The export's native.json, checked (romscale.utils.outputs checks the folder's files)."""
    from romscale.utils.outputs import read_json, read_manifest

    folder = Path(folder)
    read_manifest(folder, NATIVE_KIND, RomscaleError)  # every file listed, sized and hashed
    meta = read_json(folder / NATIVE_FILE, RomscaleError)
    if not isinstance(meta, dict) or meta.get("format") != NATIVE_KIND or meta.get("weights") not in WEIGHTS:
        raise RomscaleError(f"{folder / NATIVE_FILE}: not a native export description of a known version")
    programs = [PROGRAM_FILE] + ([meta["decode_program"]] if meta.get("decode_program") else [])
    if any(p not in (PROGRAM_FILE, DECODE_FILE) for p in programs):
        raise RomscaleError(f"{folder / NATIVE_FILE}: names a program other than {PROGRAM_FILE} / {DECODE_FILE}")
    _check_external_data(folder, programs)
    return meta


def _check_external_data(folder: Path, programs: list[str]) -> None:
    """Every external tensor of the programs lies in WEIGHTS_FILE, inside the file: ONNX Runtime
    would otherwise follow whatever path a program names."""
    import onnx

    size = (folder / WEIGHTS_FILE).stat().st_size if (folder / WEIGHTS_FILE).is_file() else None
    for name in programs:
        try:
            proto = onnx.load(str(folder / name), load_external_data=False)
        except Exception as exc:  # a truncated or foreign file: protobuf's own errors vary
            raise RomscaleError(f"{folder / name}: not a readable ONNX program ({exc})") from None
        for t in proto.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            try:
                off, n = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
            except ValueError:
                off, n = -1, 0
            end = off + n
            if info.get("location") != WEIGHTS_FILE or size is None or off < 0 or n < 0 or end > size:
                raise RomscaleError(f"{folder / name}: tensor {t.name!r} points outside {WEIGHTS_FILE} "
                                    f"({info.get('location')!r}, bytes up to {end})")


def export_native_from(source: str | Path, out: str | Path, *, weights: str = "fp32", overwrite: bool = False,
                       option: str = "SOURCE") -> Path:
    """Export a MeKi deploy bundle (rows from its table) or a dense model (an HF folder, a .gguf
    file, a packaged model name: the control) to the native export folder `out`."""
    from romscale.meki.io import BUNDLE_KIND, MEMORY_BUNDLE_KIND
    from romscale.utils.outputs import output_kind

    src = Path(source)
    kind = output_kind(src) if src.is_dir() else None
    if kind == MEMORY_BUNDLE_KIND:
        from romscale.meki.cli import maybe_tokenizer
        from romscale.rom.runtime import load_memory_bundle

        mb = load_memory_bundle(src)
        try:
            return export_native(mb.model, out, weights=weights, bundle=src, tokenizer=maybe_tokenizer(src),
                                 overwrite=overwrite, inputs=[src])
        finally:
            mb.close()
    if kind == BUNDLE_KIND:
        from romscale.meki.cli import maybe_tokenizer
        from romscale.rom.runtime import load_bundle

        b = load_bundle(src)
        try:
            return export_native(b.model, out, weights=weights, bundle=src, tokenizer=maybe_tokenizer(src),
                                 overwrite=overwrite, inputs=[src])
        finally:
            b.close()
    from romscale.models import PACKAGED_MODELS, load_causal_lm, packaged_model

    path = packaged_model(str(source), option=option) if str(source) in PACKAGED_MODELS else src
    model, tok = load_causal_lm(path, dtype=torch.float32, option=option)
    return export_native(model, out, weights=weights, tokenizer=tok, overwrite=overwrite, inputs=[path])


def native_cache_for(bundle: str | Path, weights: str) -> Path:
    """Where `romscale bundle generate --runtime onnxruntime` keeps the export of `bundle`: in the
    cache, keyed by the bundle's manifest (so a changed bundle gets a new export)."""
    import hashlib

    from romscale.utils.cache import cache_dir
    from romscale.utils.outputs import MANIFEST

    digest = hashlib.sha256((Path(bundle) / MANIFEST).read_bytes()).hexdigest()[:20]
    # LAYOUT in the key: an export made by an older exporter (the hook-form MeKi graph) is not reused
    return cache_dir() / "native" / f"{digest}-{weights}-{LAYOUT}"
