"""The `romscale` command. Thin: parse arguments, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from romscale.adapters.cli import app as adapters_app
from romscale.errors import RomscaleError
from romscale.utils.machine import machine_line

app = typer.Typer(help="romscale: trade flash storage for on-device LLM quality.", no_args_is_help=True)
meki_app = typer.Typer(help="MeKi memory experts: inspect presets, retrofit, fold.", no_args_is_help=True)
app.add_typer(meki_app, name="meki")
app.add_typer(adapters_app, name="adapters")
bench_app = typer.Typer(help="Benchmarks that print figures and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


def _params_table(title: str, rows: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for col in ("RAM params", "ROM params", "fold-away (training only)", "ROM fp16"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['ram_params'] / 1e6:,.2f} M",
            f"{r['rom_params'] / 1e6:,.2f} M",
            f"{r['fold_away_params'] / 1e6:,.2f} M",
            f"{r['rom_bytes_fp16'] / 2**20:,.1f} MiB",
        )
    return table


@meki_app.command("info")
def meki_info(
    preset: str = typer.Option(..., help="tiny | demo | smollm2-135m | meki-0.6b | meki-1.7b | meki-4b"),
    d_mem: Optional[int] = typer.Option(None, help="override the preset's memory width"),
    as_json: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """RAM and ROM parameter counts of a preset, computed on the meta device (nothing allocated)."""
    from romscale.meki.config import MekiConfig
    from romscale.meki.params import parameter_report
    from romscale.meki.presets import build_model, get_preset

    try:
        p = get_preset(preset)
        model = build_model(preset, MekiConfig(d_mem=d_mem or p.d_mem), device="meta")
    except RomscaleError as exc:
        _fail(exc)
    report = {"preset": preset, **parameter_report(model)}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(_params_table(f"preset {preset}", {preset: report}))


@meki_app.command("attach")
def meki_attach(
    model_dir: Path = typer.Option(..., "--model", help="a local Hugging Face model folder (Llama/Qwen2/Qwen3/Mistral)"),
    out: Path = typer.Option(..., help="output folder for the MeKi training form"),
    d_mem: int = typer.Option(64, help="memory width"),
    memory: str = typer.Option("static+dynamic"),
    position: str = typer.Option("parallel_ffn"),
    fusion: str = typer.Option("add_sigmoid"),
) -> None:
    """Retrofit MeKi onto a pretrained model; its logits are unchanged until training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.io import save_meki

    try:
        cfg = MekiConfig(d_mem=d_mem, memory=memory, position=position, fusion=fusion)
        if not (model_dir / "config.json").is_file():
            raise RomscaleError(f"--model {model_dir}: no config.json there; expected a local Hugging Face model folder")
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        attach_meki(model, cfg)
        try:
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError):
            tok = None
        save_meki(model, out, tokenizer=tok)
    except RomscaleError as exc:
        _fail(exc)
    console.print(f"MeKi training form written to {out}")


@meki_app.command("fold")
def meki_fold(
    src: Path = typer.Argument(..., help="a MeKi checkpoint folder (training form)"),
    dst: Path = typer.Argument(..., help="output folder for the folded (deployed) form"),
) -> None:
    """Fold the training form into one table per layer and save the deployed form."""
    from romscale.meki.fold import fold
    from romscale.meki.io import load_meki, save_meki
    from romscale.meki.params import parameter_report

    try:
        if src.resolve() == dst.resolve():
            raise RomscaleError("fold writes a new folder: SRC and DST must differ (inputs are never modified)")
        model = load_meki(src)
        before = parameter_report(model)
        fold(model)
        tok = _maybe_tokenizer(src)
        save_meki(model, dst, tokenizer=tok)
    except RomscaleError as exc:
        _fail(exc)
    console.print(_params_table(f"folded {src} -> {dst}", {"training form": before, "folded": parameter_report(model)}))


def _maybe_tokenizer(path: Path):
    if not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (results.json, loss.png, folded model)"),
    steps: int = typer.Option(300, help="training steps per arm"),
    preset: str = typer.Option("demo"),
    d_mem: Optional[int] = typer.Option(None, help="memory width (default: the preset's, d/8)"),
    seed: int = typer.Option(0),
) -> None:
    """The main job: train dense and MeKi on real text, fold, generate, report RAM vs ROM."""
    from romscale.pipeline import DemoConfig, run_demo

    try:
        r = run_demo(DemoConfig(out=out, steps=steps, preset=preset, d_mem=d_mem, seed=seed), log=console.print)
    except RomscaleError as exc:
        _fail(exc)
    table = Table(title=f"{preset} on Shakespeare, {steps} steps per arm ({r['machine']})")
    for col in ("arm", "val loss (nats)", "train s", "RAM params", "ROM params"):
        table.add_column(col, justify="right")
    d, m = r["dense"], r["meki_run"]
    table.add_row("dense", f"{d['val_loss']:.4f}", f"{d['train_seconds']}", f"{d['params']['ram_params']:,}", "0")
    table.add_row(
        "MeKi (folded)",
        f"{m['val_loss']:.4f}",
        f"{m['train_seconds']}",
        f"{m['params_folded']['ram_params']:,}",
        f"{m['params_folded']['rom_params']:,}",
    )
    console.print(table)
    fc = r["fold_check"]
    console.print(
        f"fold check: max |logit diff| = {fc['max_abs_logit_diff']:.2e}, greedy tokens identical: {fc['greedy_tokens_identical']}"
    )
    console.print(f"sample ({r['sample']['prompt']!r}): {r['sample']['continuation']!r}")
    console.print(f"wrote {out / 'results.json'}, {out / 'loss.png'}, {out / 'meki-folded'} in {r['total_seconds']} s")


@app.command("export")
def export(
    src: Path = typer.Argument(..., help="a MeKi checkpoint folder (folded, or training form: it is folded first)"),
    bundle: Path = typer.Option(..., "--bundle", help="output bundle folder"),
    dtype: str = typer.Option("fp16", help="ROM table dtype: fp16 | bf16 | int8"),
) -> None:
    """Write a deploy bundle: RAM part (safetensors + config) and one packed ROM table file."""
    from romscale.meki.fold import fold
    from romscale.meki.io import load_meki
    from romscale.rom.runtime import export_bundle

    try:
        model = fold(load_meki(src))
        export_bundle(model, bundle, dtype=dtype, tokenizer=_maybe_tokenizer(src))
    except RomscaleError as exc:
        _fail(exc)
    console.print(f"bundle written to {bundle}")


@app.command("verify")
def verify(bundle: Path = typer.Option(..., "--bundle", help="a deploy bundle folder")) -> None:
    """Check the bundle's manifests, its match with the RAM part, and every block checksum."""
    from romscale.rom.runtime import load_bundle

    try:
        b = load_bundle(bundle)
        b.table.verify()
        m = b.table.manifest
        b.close()
    except RomscaleError as exc:
        _fail(exc)
    blocks = sum(len(e["block_sha256"]) for e in m["tensors"].values())
    console.print(
        f"OK: {bundle} ({m['dtype']} table, {m['vocab_size']} x {m['num_layers']} x {m['d_mem']}, {blocks} blocks checked)"
    )


@app.command("generate")
def generate(
    bundle: Path = typer.Option(..., "--bundle", help="a deploy bundle folder with a tokenizer"),
    prompt: str = typer.Option(..., help="prompt text"),
    max_new_tokens: int = typer.Option(64),
    sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(0.8),
    top_p: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    prefetch: bool = typer.Option(True, help="fetch each token's rows on a background thread"),
) -> None:
    """Stream a continuation from a deploy bundle, reading the table rows from storage."""
    import torch
    from transformers import TextStreamer

    from romscale.rom.fused import fuse_meki_ffn
    from romscale.rom.runtime import load_bundle

    try:
        tok = _maybe_tokenizer(bundle)
        if tok is None:
            raise RomscaleError(f"--bundle {bundle}: no tokenizer files in the bundle (export from a folder that has them)")
        b = load_bundle(bundle, prefetch=prefetch)
    except RomscaleError as exc:
        _fail(exc)
    fuse_meki_ffn(b.model)
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    b.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        streamer=TextStreamer(tok, skip_prompt=False),
    )
    b.close()


@bench_app.command("decode")
def bench_decode_cmd(
    json_out: Path = typer.Option(..., "--json", help="write the results here"),
    preset: str = typer.Option("smollm2-135m"),
    d_mem: list[int] = typer.Option([72], help="memory width; repeat for several"),
    new_tokens: int = typer.Option(32, help="tokens per timed run"),
    memory_tokens: int = typer.Option(256, help="tokens generated in the memory probes"),
    runs: int = typer.Option(9, help="timed runs per arm (>= 5)"),
    table_dtype: str = typer.Option("fp16"),
    prefetch: bool = typer.Option(False),
    fused: bool = typer.Option(True, help="use the fused FFN + MeKi decode path"),
) -> None:
    """Batch-1 greedy decode: dense vs MeKi bundle (table on storage) vs unfolded form, plus a fused-dense control."""
    import sys

    from romscale.bench.decode import DecodeBenchConfig, bench_decode
    from romscale.utils.atomic import atomic_write_json

    results = []
    for dm in d_mem:
        cfg = DecodeBenchConfig(
            preset=preset, d_mem=dm, new_tokens=new_tokens, memory_tokens=memory_tokens, runs=runs,
            table_dtype=table_dtype, prefetch=prefetch, fused=fused,
        )
        try:
            results.append(bench_decode(cfg, log=console.print))
        except (RomscaleError, ValueError) as exc:
            _fail(exc)
    table = Table(title=f"batch-1 greedy decode, {preset}, median of {runs} ({machine_line()})")
    cols = ("d_mem", "dense tok/s", "MeKi tok/s", "ratio", "ratio (cold each run)", "dense fused tok/s", "MeKi / dense fused",
            "unfolded tok/s", "table MiB", "resident/touched", "RSS delta / table")
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["config"]["d_mem"]), f"{r['dense_tok_s']:.2f}", f"{r['meki_tok_s']:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_cold']:.3f}",
            f"{r['dense_fused_tok_s']:.2f}", f"{r['ratio_vs_dense_fused']:.3f}", f"{r['unfolded_tok_s']:.2f}",
            f"{r['table_bytes'] / 2**20:.1f}", f"{r['resident_over_touched']:.2f}", f"{r['rss_delta_over_table']:.3%}",
        )
    console.print(table)
    atomic_write_json(json_out, {"command": "romscale " + " ".join(sys.argv[1:]), "machine": machine_line(), "results": results})
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    app()
