"""`romscale eval mc`: zero-shot multiple choice by log-likelihood (romscale.eval.mc).

Imports only typer and cli_common at the top: options are checked before torch is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import JSON_HELP, at_least, check_output, overwrite_option, write_json

MC_KIND = "mc-eval"


def _task_names(tasks: Optional[str], files: list[Path]) -> list[str]:
    from romscale.cli_common import UsageError
    from romscale.eval.mc_data import BIGBENCH_MC_TASKS

    if tasks is None:
        return [] if files else list(BIGBENCH_MC_TASKS)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if names == ["all"]:
        return list(BIGBENCH_MC_TASKS)
    unknown = [n for n in names if n not in BIGBENCH_MC_TASKS]
    if unknown or not names:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown) or repr(tasks)}; "
                         f"expected 'all' or a comma-separated list of {', '.join(BIGBENCH_MC_TASKS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--tasks: a task is named twice in {tasks!r}")
    return names


def mc(
    model: Path = typer.Option(..., "--model", help="packaged model name, HF folder, .gguf file, training run, memory checkpoint or bundle"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="BIG-bench MC tasks, comma-separated, or 'all' "
                                        "(default: all, or none when --file is given)"),
    files: list[Path] = typer.Option([], "--file", help="a local .json/.jsonl multiple-choice file (repeatable; "
                                     "task name = file stem); docs/evaluation.md gives the format"),
    limit: Optional[int] = typer.Option(None, "--limit", help="score the first N items of each task"),
    batch_size: int = typer.Option(16, "--batch-size", help="requests (item x choice) per forward"),
    json_path: Path = typer.Option(..., "--json", help=JSON_HELP.replace("also write", "write"), metavar="PATH"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Score multiple-choice tasks zero-shot by log-likelihood (acc and acc_norm, as lm-evaluation-harness)."""
    from romscale.cli_common import UsageError
    from romscale.eval.mc import model_kind

    if limit is not None:
        at_least("--limit", limit, 1)
    at_least("--batch-size", batch_size, 1)
    names = _task_names(tasks, files)
    for f in files:
        if not f.is_file():
            raise UsageError(f"--file {f}: is not a file; expected a .json or .jsonl multiple-choice file")
        if f.suffix.lower() not in (".json", ".jsonl"):
            raise UsageError(f"--file {f}: expected a .json or .jsonl file, got suffix {f.suffix!r}")
    stems = [f.stem for f in files]
    clash = sorted({s for s in stems if stems.count(s) > 1 or s in names})
    if clash:
        raise UsageError(f"--file: task name(s) {', '.join(clash)} (the file stem) are used twice; rename the file")
    kind = model_kind(model, "--model")
    check_output("--json", json_path, kind=MC_KIND, inputs=[model, *files], overwrite=overwrite, is_file=True)

    import sys
    import time

    from rich.console import Console
    from rich.table import Table

    from romscale.eval.mc import evaluate_mc, load_scoring_model
    from romscale.eval.mc_data import BIGBENCH_MC_TASKS, load_bigbench_mc, load_mc_file
    from romscale.utils.machine import machine_line

    data = load_bigbench_mc(names, limit=limit) if names else {}
    sources = {n: f"bigbench==1.0.0 {BIGBENCH_MC_TASKS[n]}" for n in names}
    for f, stem in zip(files, stems):
        data[stem] = load_mc_file(f, limit=limit)
        sources[stem] = str(f)
    sm = load_scoring_model(model, option="--model")
    try:
        if sm.tokenizer is None:
            raise UsageError(f"--model {model}: has no tokenizer files; multiple-choice scoring needs the model's tokenizer")
        t0 = time.perf_counter()
        results = evaluate_mc(sm.model, sm.tokenizer, data, batch_size=batch_size, progress=True)
        seconds = round(time.perf_counter() - t0, 2)
    finally:
        sm.close()
    tasks_out = {n: r.summary() | {"source": sources[n]} for n, r in results.items()}
    mean = {k: sum(r[k] for r in tasks_out.values()) / len(tasks_out) for k in ("acc", "acc_norm", "chance")}
    table = Table(title=f"zero-shot multiple choice: {model}")
    for col in ("task", "n", "acc", "acc_norm", "chance"):
        table.add_column(col, justify="right")
    for n, r in tasks_out.items():
        table.add_row(n, str(r["n"]), f"{100 * r['acc']:.1f}", f"{100 * r['acc_norm']:.1f}", f"{100 * r['chance']:.1f}")
    table.add_row("mean", "", f"{100 * mean['acc']:.1f}", f"{100 * mean['acc_norm']:.1f}", f"{100 * mean['chance']:.1f}")
    Console().print(table)
    print(f"scored {sum(r['n'] for r in tasks_out.values())} items in {seconds} s", file=sys.stderr)
    write_json(json_path, {
        "model": str(model), "model_kind": kind, "limit": limit, "batch_size": batch_size, "seconds": seconds,
        "machine": machine_line(), "scoring": "sum log p(' ' + choice | context); acc_norm divides by len(choice) in characters (lm_eval)",
        "mean": mean, "tasks": tasks_out,
        "items": {n: r.items for n, r in results.items()},
    }, inputs=[model, *files], overwrite=overwrite, kind=MC_KIND)
