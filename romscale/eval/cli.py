"""`romscale eval ...` commands (thin: options are checked before torch is imported; the work is in
romscale.eval.generate). One base model is loaded per run and serves every adapter through one
AdapterSlot: rows are `zero-shot` (no adapter) and `individual` (each task with its own LoRA)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from romscale.cli_common import (
    UsageError,
    at_least,
    check_output,
    choice,
    existing_dir,
    overwrite_option,
    write_json,
)

app = typer.Typer(help="Evaluate adapters on a task bank.", no_args_is_help=True, pretty_exceptions_enable=False)

SPLITS = ("train", "val", "test")  # romscale.data.taskbank.SPLITS (kept here: options are checked before imports)
REPORT_KIND = "eval-tasks"


def _pairs(values: List[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--adapter must be TASK=DIR; got {v!r}")
        if name.strip() in out:
            raise UsageError(f"--adapter: task {name.strip()!r} is given twice")
        out[name.strip()] = existing_dir("--adapter", Path(path.strip()), f"a PEFT LoRA folder for task {name.strip()}")
    return out


@app.command("tasks")
def tasks_cmd(
    bank: Path = typer.Option(..., "--bank", help="task bank folder (romscale data taskbank)"),
    base: str = typer.Option(..., "--base", help="base model: smollm2-135m-instruct, a HF folder or a .gguf file"),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="adapter library (romscale adapters train --out LIB): "
                                            "each task with its own adapter"),
    adapter: List[str] = typer.Option([], "--adapter", help="TASK=DIR: this PEFT folder as TASK's own adapter (repeatable; "
                                      "overrides --adapters for that task)"),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="also evaluate the base model without adapters"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated task or subset names (default: all)"),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="the first N examples of each task's split"),
    loss_examples: int = typer.Option(5, "--loss-examples", help="val examples per task for the mean target-token loss (0: none)"),
    batch_size: int = typer.Option(16, "--batch-size", help="sequences per forward / generate call"),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast"),
    json_out: Path = typer.Option(..., "--json", help="write the results as JSON to this file", metavar="PATH"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Score each task under zero-shot and its own LoRA (one base model load for all)."""
    existing_dir("--bank", bank, "a task bank folder (romscale data taskbank --out DIR)")
    choice("--split", split, SPLITS)
    if limit is not None:
        at_least("--limit", limit, 1)
    at_least("--loss-examples", loss_examples, 0)
    at_least("--batch-size", batch_size, 1)
    if adapters is not None:
        existing_dir("--adapters", adapters, "an adapter library (romscale adapters train --out LIB)")
    explicit = _pairs(adapter)
    if not zero_shot and adapters is None and not explicit:
        raise UsageError("nothing to evaluate: give --zero-shot, --adapters LIB or --adapter TASK=DIR")
    from romscale.models import PACKAGED_MODELS, resolve_model_source

    if base not in PACKAGED_MODELS:
        resolve_model_source(base, "--base")
    inputs = [bank, *([adapters] if adapters else []), *explicit.values()]
    check_output("--json", json_out, kind=REPORT_KIND, inputs=inputs, overwrite=overwrite, is_file=True)

    from romscale.adapters.library import load_library
    from romscale.adapters.peft_io import read_peft_adapter
    from romscale.adapters.train import load_base
    from romscale.data.taskbank import TaskBank
    from romscale.errors import AdapterError
    from romscale.eval.generate import evaluate_bank

    tb = TaskBank.open(bank, tasks)
    for name in explicit:
        if name not in tb.names:
            raise UsageError(f"--adapter {name}=...: {name!r} is not a selected task of {bank} ({', '.join(tb.names[:8])})")
    methods: dict[str, dict] = {}
    if zero_shot:
        methods["zero-shot"] = {t: None for t in tb.names}
    if adapters is not None or explicit:
        own: dict = {}
        if adapters is not None:
            from romscale.adapters.library import library_tasks

            have = library_tasks(adapters)
            wanted = [t for t in tb.names if t not in explicit]
            missing = [t for t in wanted if t not in have]
            if missing:
                raise AdapterError(f"--adapters {adapters}: no finished adapter for {missing[:5]}; train them "
                                   f"(romscale adapters train --tasks ...) or narrow --tasks")
            if wanted:
                lib = load_library(adapters, wanted)
                own.update({a.name: a for a in lib.adapters})
        for name, folder in explicit.items():
            own[name] = read_peft_adapter(folder, name)
        methods["individual"] = {t: own[t] for t in tb.names if t in own}
    model, tokenizer = load_base(base, progress=sys.stderr.isatty())
    results = evaluate_bank(tb, model, tokenizer, methods, split=split, limit=limit, loss_examples=loss_examples,
                            batch_size=batch_size, bf16=bf16, progress=sys.stderr.isatty())
    _table(results, tb.names, split)
    write_json(json_out, {"bank": str(bank), "base": base, "split": split, "limit": limit, "loss_examples": loss_examples,
                          "bf16": bf16, "methods": results}, inputs=inputs, overwrite=overwrite, kind=REPORT_KIND)


def _table(results: dict, names: list[str], split: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"task scores ({split}; 0-100)")
    table.add_column("task")
    table.add_column("metric")
    for m in results:
        table.add_column(m, justify="right")
        table.add_column(f"{m} loss", justify="right")
    for t in names:
        first = next((results[m]["tasks"][t] for m in results if t in results[m]["tasks"]), None)
        row = [t, first["metric"] if first else "-"]
        for m in results:
            r = results[m]["tasks"].get(t)
            row += [f"{r['score']:.1f}" if r else "-", f"{r['loss']:.3f}" if r and r["loss"] is not None else "-"]
        table.add_row(*row)
    table.add_row("mean", "", *[x for m in results for x in
                                 (f"{results[m]['mean_score']:.1f}" if results[m]["mean_score"] is not None else "-", "")])
    Console().print(table)


from romscale.eval.mc_cli import mc  # noqa: E402  (zero-shot multiple choice; owner: romscale.eval.mc)

app.command("mc")(mc)
