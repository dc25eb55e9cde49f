"""`romscale analyze <verb>`: logit-lens KL per layer, validation loss by token frequency.

Imports only typer and cli_common at the top: options are checked before torch is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from romscale.cli_common import at_least, check_output, existing_dir, overwrite_option, write_json

app = typer.Typer(help="Analyses of trained models on a corpus's validation split (JSON + PNG).", no_args_is_help=True)

LENS_KIND = "logit-lens"
FREQ_KIND = "token-freq"


def _models_option():
    return typer.Option(..., "--model", help="a model to analyse (repeatable): HF folder, .gguf, training run, memory checkpoint or bundle")


def _corpus_option():
    return typer.Option(..., "--corpus", help="a corpus folder (romscale data corpus) whose tokenizer the models use")


def _json_option():
    return typer.Option(..., "--json", help="write the results as JSON to this file", metavar="PATH")


def _png_option():
    return typer.Option(..., "--png", help="write the plot as PNG to this file", metavar="PATH")


def _tokens_option():
    return typer.Option(32768, "--tokens", help="validation targets to score (the first N of the split)")


def _seq_len_option():
    return typer.Option(256, "--seq-len", help="context length of each validation block")


def _batch_option():
    return typer.Option(4, "--batch-size", help="blocks per forward")


def _check(models: list[Path], corpus: Path, json_path: Path, png: Path, kind: str, tokens: int, seq_len: int,
           batch_size: int, overwrite: bool) -> list[Path]:
    from romscale.cli_common import UsageError
    from romscale.eval.mc import model_kind
    from romscale.utils.outputs import output_kind

    at_least("--tokens", tokens, 1)
    at_least("--seq-len", seq_len, 1)
    at_least("--batch-size", batch_size, 1)
    existing_dir("--corpus", corpus, "a corpus folder written by `romscale data corpus`")
    if output_kind(corpus) != "corpus":
        raise UsageError(f"--corpus {corpus}: is not a complete romscale corpus (no corpus manifest); "
                         "expected a folder written by `romscale data corpus`")
    for m in models:
        model_kind(m, "--model")
    if len({m.resolve() for m in models}) != len(models):
        raise UsageError("--model: the same model is given twice")
    if json_path.resolve() == png.resolve():
        raise UsageError("--json and --png name the same file")
    inputs = [*models, corpus]
    check_output("--json", json_path, kind=kind, inputs=inputs, overwrite=overwrite, is_file=True)
    check_output("--png", png, kind="png", inputs=inputs, overwrite=overwrite, is_file=True)
    return inputs


def _write(report: dict, fig, json_path: Path, png: Path, kind: str, inputs: list[Path], overwrite: bool) -> None:
    import sys

    from romscale.utils.machine import machine_line
    from romscale.utils.outputs import write_png_output

    write_json(json_path, {"machine": machine_line(), **report}, inputs=inputs, overwrite=overwrite, kind=kind)
    write_png_output(png, fig, inputs=inputs, overwrite=overwrite, what="--png")
    print(f"wrote {png}", file=sys.stderr)


@app.command("logit-lens")
def logit_lens_cmd(
    models: list[Path] = _models_option(), corpus: Path = _corpus_option(), json_path: Path = _json_option(),
    png: Path = _png_option(), tokens: int = _tokens_option(), seq_len: int = _seq_len_option(),
    batch_size: int = _batch_option(), overwrite: bool = overwrite_option(),
) -> None:
    """Per layer, mean KL(final prediction || logit lens of that layer) on validation tokens."""
    inputs = _check(models, corpus, json_path, png, LENS_KIND, tokens, seq_len, batch_size, overwrite)
    from romscale.analysis.logit_lens import logit_lens_report, plot_logit_lens

    report = logit_lens_report(models, corpus, tokens=tokens, seq_len=seq_len, batch_size=batch_size, progress=True)
    for m in report["models"]:
        print(f"{m['label']}: KL per layer " + " ".join(f"{v:.3f}" for v in m["kl"]))
    _write(report, plot_logit_lens(report), json_path, png, LENS_KIND, inputs, overwrite)


@app.command("token-freq")
def token_freq_cmd(
    models: list[Path] = _models_option(), corpus: Path = _corpus_option(), json_path: Path = _json_option(),
    png: Path = _png_option(), tokens: int = _tokens_option(), seq_len: int = _seq_len_option(),
    batch_size: int = _batch_option(),
    edges: Optional[str] = typer.Option(None, "--edges", help="bucket boundaries on the training count, comma-separated "
                                        "(default: decades 0, 1, 10, 100, ...)"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Validation loss split by the target token's frequency in the training shards."""
    from romscale.cli_common import UsageError

    parsed = None
    if edges is not None:
        try:
            parsed = [int(x) for x in edges.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--edges must be comma-separated whole numbers; got {edges!r}") from None
        if not parsed or any(x < 0 for x in parsed):
            raise UsageError(f"--edges must be non-negative whole numbers; got {edges!r}")
    inputs = _check(models, corpus, json_path, png, FREQ_KIND, tokens, seq_len, batch_size, overwrite)
    from romscale.analysis.freq import plot_token_freq, token_freq_report

    report = token_freq_report(models, corpus, tokens=tokens, seq_len=seq_len, batch_size=batch_size, edges=parsed, progress=True)
    for m in report["models"]:
        cells = " ".join(f"{b['label']}={v:.3f}" for b, v in zip(report["buckets"], m["loss"]) if v is not None)
        print(f"{m['label']}: all={m['loss_all']:.3f} {cells}")
    _write(report, plot_token_freq(report), json_path, png, FREQ_KIND, inputs, overwrite)
