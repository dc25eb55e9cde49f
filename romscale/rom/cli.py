"""`romscale bundle ...`: deploy bundles (export, verify, generate) and the decode benchmark.
Thin: check options, call the library, print. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import (
    UsageError, at_least, check_output, choice, existing_dir, in_range, json_option, out_option, overwrite_option,
    seed_option, write_json,
)
from romscale.errors import RomscaleError

app = typer.Typer(help="Deploy bundles: RAM part + ROM table on flash; export, verify, generate, bench.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks of bundles that print figures and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

TABLE_DTYPES = ("fp16", "bf16", "int8")  # romscale.rom.table.DTYPES, without importing torch
RUNTIMES = ("torch", "onnxruntime")
NATIVE_WEIGHTS = ("fp32", "fp16", "int8")  # romscale.rom.onnx_export.WEIGHTS
BUNDLE_HELP = "a deploy bundle folder (romscale bundle export)"


def _console():
    from rich.console import Console

    return Console()


def _console_wide():
    from rich.console import Console

    return Console(width=220)


@app.command("export")
def export(
    src: Path = typer.Argument(..., help="a MeKi checkpoint folder (folded, or training form: it is folded first), or a memory checkpoint (PLE, Engram, fat embedding; romscale.meki.io.save_memories)"),
    out: Path = out_option(help="output bundle folder"),
    dtype: str = typer.Option("fp16", help="ROM table dtype: fp16 | bf16 | int8"),
    clamp: bool = typer.Option(False, help="saturate table values beyond the dtype's range instead of refusing them (NaN is always refused)"),
    block_rows: int = typer.Option(4096, help="rows per sha256 block in the ROM manifest"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Write a deploy bundle: RAM part (safetensors + config) and one packed ROM table file per memory."""
    choice("--dtype", dtype, TABLE_DTYPES)
    at_least("--block-rows", block_rows, 1)
    existing_dir("SRC", src, "a MeKi checkpoint folder")
    from romscale.utils.outputs import output_kind

    memories = output_kind(src) == "memory-checkpoint"  # PLE / Engram / fat / several: one table per memory
    check_output("--out", out, kind="memory-bundle" if memories else "meki-bundle", inputs=[src], overwrite=overwrite)
    from romscale.meki.cli import maybe_tokenizer
    from romscale.meki.fold import fold
    from romscale.meki.io import load_memories, load_meki
    from romscale.rom.runtime import export_bundle, export_memory_bundle

    if memories:
        from romscale.memories.base import attached_memories

        model = load_memories(src)
        for mem in attached_memories(model):
            if mem.foldable:
                mem.fold(model)
        export_memory_bundle(model, out, dtype=dtype, tokenizer=maybe_tokenizer(src), block_rows=block_rows, clamp=clamp,
                             overwrite=overwrite, inputs=[src])
    else:
        model = fold(load_meki(src))
        export_bundle(model, out, dtype=dtype, tokenizer=maybe_tokenizer(src), block_rows=block_rows, clamp=clamp,
                      overwrite=overwrite, inputs=[src])
    _console().print(f"bundle written to {out}")


@app.command("verify")
def verify(
    bundle: Path = typer.Argument(..., help=BUNDLE_HELP),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Check every file's sha256, the config against weights and table, every block and row checksum."""
    existing_dir("BUNDLE", bundle, "a deploy bundle folder")
    check_output("--json", json_out, kind="report", inputs=[bundle], overwrite=overwrite, is_file=True)
    from romscale.rom.runtime import verify_bundle, verify_memory_bundle
    from romscale.utils.outputs import output_kind

    if output_kind(bundle) == "memory-bundle":
        s = verify_memory_bundle(bundle)
        for name, t in s["memories"].items():
            _console().print(f"OK: {bundle} {name} ({t['dtype']} table, {t['rows']} rows by {t['address']} x {t['num_layers']} x {t['width']}, "
                             f"{t['table_bytes']:,} bytes; {t['blocks']} blocks checked)")
        write_json(json_out, s, inputs=[bundle], overwrite=overwrite)
        return
    s = verify_bundle(bundle)
    _console().print(
        f"OK: {bundle} ({s['files']} files; {s['dtype']} table, {s['vocab_size']} x {s['num_layers']} x {s['d_mem']}, "
        f"{s['table_bytes']:,} bytes; {s['blocks']} blocks and {s['rows']} rows checked)"
    )
    write_json(json_out, s, inputs=[bundle], overwrite=overwrite)


@app.command("generate")
def generate(
    bundle: Path = typer.Argument(..., help=BUNDLE_HELP + " with a tokenizer"),
    prompt: str = typer.Option(..., help="prompt text (not empty)"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate (>= 1)"),
    sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(0.8, help="sampling temperature (> 0; with --sample)"),
    top_p: float = typer.Option(0.95, help="nucleus sampling mass in (0, 1] (with --sample)"),
    seed: int = seed_option(),
    prefetch: bool = typer.Option(True, help="fetch each token's rows on a background thread"),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
    runtime: str = typer.Option("torch", help="torch (the PyTorch bundle runtime) | onnxruntime (the native export, "
                                "made once into the cache; BUNDLE may also be a `romscale bundle native` folder)"),
    weights: str = typer.Option("fp32", help="with --runtime onnxruntime: fp32 | fp16 | int8 weights of the export"),
) -> None:
    """Stream a continuation from a deploy bundle, reading (and checking) the table rows from storage."""
    if not prompt.strip():
        raise UsageError("--prompt must not be empty")
    at_least("--max-new-tokens", max_new_tokens, 1)
    if sample:
        at_least("--temperature", temperature, 0, strict=True)
        in_range("--top-p", top_p, 0, 1, low_open=True)
    choice("--runtime", runtime, RUNTIMES)
    choice("--weights", weights, NATIVE_WEIGHTS)
    existing_dir("BUNDLE", bundle, "a deploy bundle folder")
    from romscale.meki.cli import maybe_tokenizer

    if runtime == "onnxruntime":
        _generate_native(bundle, weights, prompt, max_new_tokens, sample, temperature, top_p, seed, chat)
        return
    tok = maybe_tokenizer(bundle)
    if tok is None:
        raise RomscaleError(f"BUNDLE {bundle}: holds no tokenizer files (export from a checkpoint folder that has them)")
    import torch
    from transformers import TextStreamer

    from romscale.rom.fused import fuse_meki_ffn
    from romscale.rom.runtime import load_bundle, load_memory_bundle
    from romscale.utils.outputs import output_kind

    load = load_memory_bundle if output_kind(bundle) == "memory-bundle" else load_bundle
    b = load(bundle, prefetch=prefetch)
    try:
        vocab = b.model.get_input_embeddings().num_embeddings
        ids = _prompt_ids(tok, prompt, chat, bundle)
        if int(ids.max()) >= vocab:
            raise RomscaleError(f"BUNDLE {bundle}: the tokenizer produced id {int(ids.max())} but the model has {vocab} rows")
        fuse_meki_ffn(b.model)
        torch.manual_seed(seed)
        # Stop at EOS and, for chat models, at the end of the assistant's turn (ChatML's <|im_end|>).
        eos = [t for t in (tok.eos_token_id, tok.get_vocab().get("<|im_end|>")) if isinstance(t, int) and 0 <= t < vocab]
        b.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            eos_token_id=eos or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0),
            streamer=TextStreamer(tok, skip_prompt=False),
        )
    finally:
        b.close()


def _prompt_ids(tok, prompt: str, chat: bool, where: Path):
    import torch

    if chat:
        if not getattr(tok, "chat_template", None):
            raise UsageError(f"--chat: the tokenizer in {where} has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise UsageError("--prompt encodes to no tokens")
    return ids


def _generate_native(bundle: Path, weights: str, prompt: str, max_new_tokens: int, sample: bool, temperature: float,
                     top_p: float, seed: int, chat: bool) -> None:
    import os

    import torch
    from transformers import TextStreamer

    from romscale.meki.cli import maybe_tokenizer
    from romscale.rom.onnx_export import NATIVE_KIND, export_native_from, native_cache_for
    from romscale.rom.ort_runtime import OrtDecoder
    from romscale.utils.outputs import output_kind

    if output_kind(bundle) == NATIVE_KIND:
        folder, rows_from = bundle, None
    else:
        folder, rows_from = native_cache_for(bundle, weights), bundle
        if output_kind(folder) != NATIVE_KIND:
            _console().print(f"exporting {bundle} to ONNX ({weights}) once, into {folder}")
            export_native_from(bundle, folder, weights=weights, option="BUNDLE", overwrite=folder.exists())
    tok = maybe_tokenizer(folder)
    if tok is None:
        raise RomscaleError(f"BUNDLE {bundle}: holds no tokenizer files (export from a checkpoint folder that has them)")
    dec = OrtDecoder(folder, threads=os.cpu_count() or 1, bundle=rows_from)
    try:
        ids = _prompt_ids(tok, prompt, chat, bundle)
        if int(ids.max()) >= dec.vocab:
            raise RomscaleError(f"BUNDLE {bundle}: the tokenizer produced id {int(ids.max())} but the model has {dec.vocab} rows")
        eos = [t for t in (tok.eos_token_id, tok.get_vocab().get("<|im_end|>")) if isinstance(t, int) and 0 <= t < dec.vocab]
        streamer = TextStreamer(tok, skip_prompt=False)
        streamer.put(ids)
        dec.generate(ids.numpy(), max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                     seed=seed, eos=eos, on_token=lambda t: streamer.put(torch.from_numpy(t)))
        streamer.end()
    finally:
        dec.close()


@app.command("native")
def native(
    source: str = typer.Argument(..., help="a deploy bundle folder (romscale bundle export: MeKi, or a memory bundle "
                                 "with PLE / the fat embedding / several memories), or a dense model: an HF folder, "
                                 "a .gguf file or a packaged model name (the control)"),
    out: Path = out_option(help="output folder of the native export (ONNX program + tokenizer)"),
    weights: str = typer.Option("fp32", help="fp32 | fp16 | int8 (weight-only, 8-bit, blocks of 32 along the input)"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Export the RAM part to an ONNX program for ONNX Runtime; a MeKi table stays in the bundle."""
    choice("--weights", weights, NATIVE_WEIGHTS)
    from romscale.models import PACKAGED_MODELS

    src = Path(source)
    if source not in PACKAGED_MODELS and not src.exists():
        raise UsageError(f"SOURCE {source}: no such file or folder; expected a deploy bundle, a model folder, a .gguf "
                         f"file or one of {', '.join(PACKAGED_MODELS)}")
    check_output("--out", out, kind="onnx-program", inputs=[src] if src.exists() else [], overwrite=overwrite)
    from romscale.rom.onnx_export import export_native_from

    export_native_from(source, out, weights=weights, overwrite=overwrite)
    _console().print(f"native export written to {out}")


@bench_app.command("decode")
def bench_decode_cmd(
    json_out: Path = typer.Option(..., "--json", help="write the results here", metavar="PATH"),
    preset: str = typer.Option("smollm2-135m"),
    d_mem: list[int] = typer.Option([72], help="memory width; repeat for several"),
    new_tokens: int = typer.Option(32, help="tokens per timed run"),
    memory_tokens: int = typer.Option(256, help="tokens generated in the memory probes"),
    min_pairs: int = typer.Option(10, help="paired rounds before the stop rule is consulted"),
    max_pairs: int = typer.Option(60, help="most paired rounds"),
    target_halfwidth: float = typer.Option(0.015, help="stop when the 95% CIs of the ratios are this narrow (fraction)"),
    max_seconds: float = typer.Option(1800.0, help="stop the warm (paired) series after this long, per d_mem"),
    cold_rounds: int = typer.Option(10, help="rounds with the table's page cache dropped before each MeKi run (0: none, else >= 2)"),
    table_dtype: str = typer.Option("fp16", help="fp16 | bf16 | int8"),
    prefetch: bool = typer.Option(False),
    fused: bool = typer.Option(True, help="use the fused FFN + MeKi decode path"),
    unfolded: bool = typer.Option(True, help="also time the unfolded training form (a reference arm)"),
    interleave: str = typer.Option("token", help="token: arms decode in lockstep, one token each in turn | run: one generate() call per arm"),
    seed: int = seed_option(),
    overwrite: bool = overwrite_option(),
    runtime: str = typer.Option("torch", help="torch: the PyTorch bundle runtime's arms | onnxruntime: the native export "
                                "(dense and MeKi) next to llama.cpp and HF eager, on the packaged SmolLM2 weights "
                                "(--min-pairs paired rounds, no stop rule)"),
    weights: str = typer.Option("fp32", help="with --runtime onnxruntime: fp32 | fp16 | int8 (llama.cpp: f32 | f16 | q8_0)"),
    anchor: bool = typer.Option(True, help="with --runtime onnxruntime: the llama.cpp arm (pip install 'romscale\\[bench]')"),
    work: Optional[Path] = typer.Option(None, help="with --runtime onnxruntime: folder for the exports, the bundle and the "
                                        "GGUF, reused between runs (default: in the romscale cache)"),
) -> None:
    """Batch-1 greedy decode, paired rounds: HF dense vs dense with the fused layout vs the MeKi bundle
    (table on storage, rows verified); 95% CIs of the speed ratios. --runtime onnxruntime: the native
    runtime's dense and MeKi exports against llama.cpp at the same weight precision."""
    choice("--runtime", runtime, RUNTIMES)
    choice("--weights", weights, NATIVE_WEIGHTS)
    if runtime == "onnxruntime":
        _bench_native(json_out, d_mem, weights, table_dtype, new_tokens, memory_tokens, min_pairs, anchor, work, seed, overwrite)
        return
    choice("--table-dtype", table_dtype, TABLE_DTYPES)
    choice("--interleave", interleave, ("token", "run"))
    for dm in d_mem:
        at_least("--d-mem", dm, 1)
    at_least("--new-tokens", new_tokens, 1)
    at_least("--memory-tokens", memory_tokens, 1)
    at_least("--min-pairs", min_pairs, 2)
    at_least("--max-pairs", max_pairs, min_pairs)
    in_range("--target-halfwidth", target_halfwidth, 0, 1, low_open=True)
    at_least("--max-seconds", max_seconds, 0, strict=True)
    if cold_rounds != 0:
        at_least("--cold-rounds", cold_rounds, 2)
    check_output("--json", json_out, kind="report", overwrite=overwrite, is_file=True)
    from romscale.bench.decode import DecodeBenchConfig, bench_decode
    from romscale.meki.presets import PRESETS
    from romscale.utils.machine import machine_line

    choice("--preset", preset, PRESETS)
    console = _console()
    results = []
    for dm in d_mem:
        cfg = DecodeBenchConfig(
            preset=preset, d_mem=dm, new_tokens=new_tokens, memory_tokens=memory_tokens, min_pairs=min_pairs,
            max_pairs=max_pairs, target_halfwidth=target_halfwidth, max_seconds=max_seconds, cold_rounds=cold_rounds,
            table_dtype=table_dtype, prefetch=prefetch, fused=fused, unfolded=unfolded, interleave=interleave, seed=seed,
        )
        results.append(bench_decode(cfg, log=console.print))
    from romscale.bench.decode import results_table

    # The table is wide: give it room when the output is a file or a pipe (rich assumes 80 columns).
    wide = console if console.is_terminal else _console_wide()
    wide.print(results_table(results, title=f"batch-1 greedy decode, {preset} ({machine_line()})"))
    write_json(json_out, {"machine": machine_line(), "results": results}, overwrite=overwrite)


def _bench_native(json_out: Path, d_mem: list[int], weights: str, table_dtype: str, new_tokens: int, memory_tokens: int,
                  rounds: int, anchor: bool, work: Optional[Path], seed: int, overwrite: bool) -> None:
    choice("--table-dtype", table_dtype, TABLE_DTYPES)
    if len(d_mem) != 1:
        raise UsageError("--d-mem: give one value with --runtime onnxruntime")
    at_least("--d-mem", d_mem[0], 1)
    at_least("--new-tokens", new_tokens, 2)
    at_least("--memory-tokens", memory_tokens, 1)
    at_least("--min-pairs", rounds, 2)
    check_output("--json", json_out, kind="report", overwrite=overwrite, is_file=True)
    if anchor:
        from romscale.rom.llamacpp import _llama_cpp

        _llama_cpp()  # the missing extra is a usage error before any work
    from romscale.bench.native import NativeBenchConfig, bench_native, native_table
    from romscale.utils.cache import cache_dir
    from romscale.utils.machine import machine_line

    cfg = NativeBenchConfig(d_mem=d_mem[0], weights=weights, table_dtype=table_dtype, new_tokens=new_tokens,
                            memory_tokens=memory_tokens, rounds=rounds, llamacpp=anchor, hf_eager=True, seed=seed)
    console = _console()
    result = bench_native(cfg, work or cache_dir() / "bench-native", log=console.print)
    wide = console if console.is_terminal else _console_wide()
    wide.print(native_table(result, f"batch-1 greedy decode, native runtime ({machine_line()})"))
    for name, t in result["targets"].items():
        wide.print(f"{name}: {'met' if t['met'] else 'NOT met'} {({k: v for k, v in t.items() if k != 'met'})}")
    write_json(json_out, {"machine": machine_line(), "runtime": "onnxruntime", **result}, overwrite=overwrite)
