"""`romscale meki ...`: inspect presets, retrofit a model, fold. Thin: check options, call the
library, print. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import (
    UsageError, at_least, check_output, choice, json_option, out_option, overwrite_option, write_json,
)

app = typer.Typer(help="MeKi memory experts: inspect presets, retrofit a model, fold.", no_args_is_help=True)

MEMORIES = ("static+dynamic", "static", "dynamic")
POSITIONS = ("parallel_ffn", "parallel_attn", "after_attn", "after_ffn")
FUSIONS = ("add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu")


def params_table(title: str, rows: dict[str, dict]):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    for col in ("RAM params", "ROM params", "fold-away (training only)", "ROM bytes (fp16)"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(
            name, f"{r['ram_params'] / 1e6:,.2f} M", f"{r['rom_params'] / 1e6:,.2f} M", f"{r['fold_away_params'] / 1e6:,.2f} M",
            f"{r['rom_bytes_fp16']:,} B ({r['rom_bytes_fp16'] / 2**20:,.1f} MiB)",
        )
    return table


def _console():
    from rich.console import Console

    return Console()


@app.command("info")
def info(
    preset: str = typer.Option(..., help="tiny | demo | smollm2-135m | meki-0.6b | meki-1.7b | meki-4b"),
    d_mem: Optional[int] = typer.Option(None, help="override the preset's memory width"),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """RAM and ROM parameters (and bytes) of a preset, computed on the meta device (nothing allocated)."""
    if d_mem is not None:
        at_least("--d-mem", d_mem, 1)
    check_output("--json", json_out, kind="report", overwrite=overwrite, is_file=True)
    from romscale.meki.config import MekiConfig
    from romscale.meki.params import preset_report
    from romscale.meki.presets import PRESETS, get_preset

    choice("--preset", preset, PRESETS)
    p = get_preset(preset)
    report = {"preset": preset, **preset_report(p, MekiConfig(d_mem=d_mem or p.d_mem))}
    _console().print(params_table(f"preset {preset}", {preset: report}))
    write_json(json_out, report, overwrite=overwrite)


@app.command("attach")
def attach(
    model_path: Path = typer.Option(..., "--model", help="a local Hugging Face model folder (Llama/Qwen2/Qwen3/Mistral) or a .gguf file / folder with one"),
    out: Path = out_option(help="output folder for the MeKi training form"),
    d_mem: int = typer.Option(64, help="memory width"),
    memory: str = typer.Option("static+dynamic", help=" | ".join(MEMORIES)),
    position: str = typer.Option("parallel_ffn", help=" | ".join(POSITIONS)),
    fusion: str = typer.Option("add_sigmoid", help=" | ".join(FUSIONS)),
    overwrite: bool = overwrite_option(),
) -> None:
    """Retrofit MeKi onto a pretrained model; its logits are unchanged until training."""
    at_least("--d-mem", d_mem, 1)
    choice("--memory", memory, MEMORIES)
    choice("--position", position, POSITIONS)
    choice("--fusion", fusion, FUSIONS)
    from romscale.models import resolve_model_source

    src = resolve_model_source(model_path, option="--model")
    if src.kind == "hf" and "meki" in _json_keys(src.folder / "config.json"):
        raise UsageError(f"--model {model_path}: already has MeKi attached (its config.json has a 'meki' section); "
                         "expected a base model without MeKi")
    check_output("--out", out, kind="meki-checkpoint", inputs=[model_path], overwrite=overwrite)
    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.io import save_meki
    from romscale.models import load_causal_lm

    cfg = MekiConfig(d_mem=d_mem, memory=memory, position=position, fusion=fusion)
    model, tok = load_causal_lm(model_path, option="--model")
    attach_meki(model, cfg)
    save_meki(model, out, tokenizer=tok, overwrite=overwrite, inputs=[model_path])
    _console().print(f"MeKi training form written to {out}")


def _json_keys(file: Path) -> set[str]:
    from romscale.utils.outputs import read_json

    obj = read_json(file)
    return set(obj) if isinstance(obj, dict) else set()


@app.command("fold")
def fold_cmd(
    src: Path = typer.Argument(..., help="a MeKi checkpoint folder (training form)"),
    out: Path = out_option(help="output folder for the folded (deployed) form"),
    overwrite: bool = overwrite_option(),
    json_out: Optional[Path] = json_option(),
) -> None:
    """Fold the training form into one table per layer and save the deployed form."""
    if not src.is_dir():
        raise UsageError(f"SRC {src}: is not a folder; expected a MeKi checkpoint folder")
    check_output("--out", out, kind="meki-checkpoint", inputs=[src], overwrite=overwrite)
    check_output("--json", json_out, kind="report", inputs=[src, out], overwrite=overwrite, is_file=True)
    from romscale.meki.fold import fold
    from romscale.meki.io import load_meki, save_meki
    from romscale.meki.params import parameter_report

    from romscale.meki.io import CHECKPOINT_KIND
    from romscale.utils.outputs import output_kind

    if output_kind(src) not in (None, CHECKPOINT_KIND):
        raise UsageError(f"SRC {src}: is a romscale {output_kind(src)}, not a MeKi checkpoint (training form) to fold")
    model = load_meki(src)
    before = parameter_report(model)
    fold(model)
    save_meki(model, out, tokenizer=maybe_tokenizer(src), overwrite=overwrite, inputs=[src])
    rows = {"training form": before, "folded": parameter_report(model)}
    _console().print(params_table(f"folded {src} -> {out}", rows))
    write_json(json_out, {"source": str(src), "output": str(out), **rows}, inputs=[src, out], overwrite=overwrite)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def maybe_tokenizer(path: Path):
    """The tokenizer saved in a romscale folder (checked by its manifest), or None."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    from romscale.errors import CheckpointError

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # tokenizers' Rust parser raises plain Exception for a malformed tokenizer.json
        raise CheckpointError(f"{path}: its tokenizer files cannot be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
