"""`romscale train CONFIG.yaml`: thin. Reads and checks the config and the run folder before any
heavy import, then calls romscale.train.trainer.train."""

from __future__ import annotations

from pathlib import Path

import typer

from romscale.cli_common import (
    UsageError,
    check_output,
    existing_dir,
    json_option,
    out_option,
    overwrite_option,
    write_json,
)


def train_command(
    config: Path = typer.Argument(..., help="YAML training config (docs/training.md lists every key)", metavar="CONFIG.yaml"),
    out: Path | None = out_option(None, help="run folder (metrics.jsonl, checkpoint/, model/); overrides the config's `out`"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in the folder from its last checkpoint"),
    overwrite: bool = overwrite_option(),
    json_out: Path | None = json_option(),
) -> None:
    """Train a language model (dense or with a memory) from a YAML config.

    Checkpoints are atomic: after kill -9, --resume continues with the same loss curve. Several
    processes: `accelerate launch -m romscale train CONFIG.yaml` or `torchrun ... -m romscale train`."""
    from romscale.train.checkpoint import run_status
    from romscale.train.config import load_config

    cfg = load_config(config)
    target = out if out is not None else (Path(cfg.out) if cfg.out else None)
    if target is None:
        raise UsageError(f"--out: no run folder; give --out DIR or set `out` in {config}")
    if not cfg.data.corpus:
        raise UsageError(f"{config}: data.corpus is not set; expected a folder written by `romscale data corpus`")
    existing_dir(f"{config}: data.corpus", Path(cfg.data.corpus), "a corpus folder written by `romscale data corpus`")
    run_status(target, resume=resume, overwrite=overwrite, inputs=[Path(cfg.data.corpus)])
    check_output("--json", json_out, kind="report", inputs=[Path(cfg.data.corpus), target], overwrite=overwrite, is_file=True)
    import sys

    from romscale.train.trainer import train

    summary = train(cfg, target, resume=resume, overwrite=overwrite, log=lambda s: print(s, file=sys.stderr))
    print(f"step {summary['steps']}: loss {summary['final_loss']:.4f}, val loss {summary['final_val_loss']:.4f}, "
          f"{summary['tokens']:,} tokens, {summary['mean_step_seconds']:.3f} s/step; wrote {target}")
    write_json(json_out, summary, inputs=[Path(cfg.data.corpus)], overwrite=overwrite)
