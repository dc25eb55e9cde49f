"""The `romscale` command. Thin: parse arguments, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from romscale.adapters.cli import app as adapters_app
from romscale.errors import RomscaleError

app = typer.Typer(help="romscale: trade flash storage for on-device LLM quality.", no_args_is_help=True)
meki_app = typer.Typer(help="MeKi memory experts: inspect presets, retrofit, fold.", no_args_is_help=True)
app.add_typer(meki_app, name="meki")
app.add_typer(adapters_app, name="adapters")
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
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


if __name__ == "__main__":
    app()
