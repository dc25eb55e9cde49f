"""`romscale adapters benchmark CONFIG.yaml`: the score-vs-storage benchmark (thin: check, run, write)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import UsageError, at_least, check_output, json_option, out_option, overwrite_option, write_json

RESULT_KIND = "adapters-benchmark-results"  # == romscale.bench.adapters.RESULT_KIND (checked by a test)


def benchmark(
    config: Path = typer.Argument(..., help="benchmark config (YAML; fields: docs/adapters.md#benchmark)"),
    out: Path = out_option(help="work folder: trained LoRAs and finished points; an existing one is resumed"),
    json_out: Optional[Path] = json_option(),
    md: Optional[Path] = typer.Option(None, "--md", help="also write the markdown table to this file", metavar="PATH"),
    png: Optional[Path] = typer.Option(None, "--png", help="also write the score-vs-storage plot to this file", metavar="PATH"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="start no new point after this many minutes; "
                                                "the results list what is missing and a rerun resumes it"),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N",
                                        help="be process I of N sharing the work (one GPU, say): every N-th task and point "
                                        "from the I-th; start shard 0 first; a run without --shard afterwards writes the results"),
    report_only: bool = typer.Option(False, "--report-only", help="train and compute nothing: report the points already "
                                     "done (while shards are running, say)"),
    reuse: Optional[Path] = typer.Option(None, "--reuse", metavar="RESULTS.json",
                                         help="take the finished points of an earlier run's results JSON instead of recomputing "
                                         "them, when this run's library is that run's (same fingerprint or training record) "
                                         "and its scoring options are the same; otherwise nothing is reused"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Train one LoRA per task, then score every method at every budget: JSON, table and plot."""
    if max_minutes is not None:
        at_least("--max-minutes", max_minutes, 0.0, strict=True)
    shard_of = _parse_shard(shard)
    if shard_of is not None and (json_out or md or png):
        raise UsageError("--shard: a shard writes its points only; write --json/--md/--png with a run without --shard")
    if report_only and (shard_of is not None or overwrite):
        raise UsageError("--report-only: takes neither --shard nor --overwrite (it reads a work folder as it is)")
    if not config.is_file():
        raise UsageError(f"CONFIG {config}: no such file; expected a YAML benchmark config")
    from romscale.utils.config import load
    from romscale.bench.adapters import AdapterBenchmarkConfig

    cfg = load(AdapterBenchmarkConfig, config, what="benchmark config", hint="docs/adapters.md#the-score-vs-storage-benchmark")
    bank = Path(cfg.bank)
    if not bank.is_dir():
        raise UsageError(f"{config}: bank {bank} is not a folder; build one with romscale data taskbank --out {bank}")
    inputs = [bank, config]
    if reuse is not None:
        if not reuse.is_file():
            raise UsageError(f"--reuse {reuse}: no such file; expected a results JSON of romscale adapters benchmark")
        from romscale.utils.outputs import read_json

        doc = read_json(reuse, UsageError)  # checked before any training
        if not isinstance(doc, dict) or doc.get("romscale_output") != RESULT_KIND:
            raise UsageError(f"--reuse {reuse}: expected a results JSON of romscale adapters benchmark")
        inputs.append(reuse)
    if report_only:
        from romscale.bench.adapters import WORK_KIND
        from romscale.utils.outputs import output_kind

        if output_kind(out) != WORK_KIND:
            raise UsageError(f"--out {out}: not a benchmark work folder; --report-only reads one a run has made")
    for opt, path in (("--json", json_out), ("--md", md), ("--png", png)):
        check_output(opt, path, kind="png" if opt == "--png" else RESULT_KIND, inputs=inputs, overwrite=overwrite, is_file=True)
    from rich.console import Console

    from romscale.bench.adapters import AdapterBenchmark
    from romscale.bench.adapters_report import figure, markdown
    from romscale.utils.outputs import write_json_output, write_png_output, write_text_output

    console = Console(stderr=True)
    run = AdapterBenchmark(cfg, out, overwrite=overwrite, progress=sys.stderr.isatty(), log=console.print, shard=shard_of,
                            reuse=reuse)
    results = run.run(max_seconds=None if max_minutes is None else 60.0 * max_minutes, report_only=report_only)
    if shard_of is not None:
        console.print(f"shard {shard}: {len(results['points'])} point(s) done, {len(results['missing'])} left; "
                      f"run without --shard to write the results")
        return
    write_json_output(run.out / "results.json", results, kind=RESULT_KIND, overwrite=True)
    text = markdown(results)
    write_text_output(run.out / "results.md", text, kind=RESULT_KIND, overwrite=True)
    fig = figure(results)
    write_png_output(run.out / "results.png", fig, overwrite=True)
    console.print(text)
    write_json(json_out, results, inputs=inputs, overwrite=overwrite, kind=RESULT_KIND)
    if md is not None:
        write_text_output(md, text, kind=RESULT_KIND, inputs=inputs, overwrite=overwrite, what="--md")
    if png is not None:
        write_png_output(png, fig, inputs=inputs, overwrite=overwrite, what="--png")


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise UsageError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4); got {value!r}")
    return int(i), int(n)
