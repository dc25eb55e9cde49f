"""`romscale adapters ...` commands (thin: check every option, then load, call the library, print).

One grammar with the other areas (romscale.cli_common): `--out DIR` for every output folder,
`--json PATH`, `--overwrite`, `--seed` mean the same everywhere; every output goes through
romscale.utils.outputs with all inputs named, so it never lands on, around or inside an input; a
bad value is one `error:` line on stderr and exit code 2, raised before anything is loaded.
Only typer and romscale.cli_common are imported here: `romscale adapters --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from romscale.cli_common import (
    UsageError,
    at_least,
    check_output,
    choice,
    existing_dir,
    in_range,
    json_option,
    out_option,
    overwrite_option,
    seed_option,
    write_json,
)
app = typer.Typer(help="Adapter libraries: inspect, merge, HydraOpt, extract, report.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

# Kept here (not imported from the library) so that options are checked before torch is imported;
# tests check they equal romscale.adapters.storage.DTYPES and the output kinds of the library.
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
ADAPTER_KIND, BUNDLE_KIND, SET_KIND = "peft-adapter", "hydraopt-bundle", "peft-adapter-set"
DEFAULT_REPORT_METHODS = "task_arithmetic,ties,dare_ties,magnitude_prune,knots,linear_ab,ties_ab"
_MISMATCH_HELP = "accept adapters whose base_model_name_or_path differ (only if these names are the same model)"
_DTYPE_HELP = "auto (the inputs' dtype) | float32 | float16 | bfloat16"


def _console():
    from rich.console import Console

    return Console()


def _progress() -> bool:
    """Progress bars only on a terminal: captured stderr then holds just the messages."""
    return sys.stderr.isatty()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None or not text.strip():
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers; got {text!r}") from None
    if not all(abs(v) < float("inf") for v in values):  # rejects inf and NaN
        raise UsageError(f"{option} must be finite numbers; got {text!r}")
    return values


def _per_input(option: str, values: Optional[list[float]], paths: List[Path]) -> None:
    if values is not None and len(values) != len(paths):
        raise UsageError(f"{option} has {len(values)} values for {len(paths)} adapters; give one per adapter")


def _adapter_dirs(paths: List[Path]) -> None:
    for p in paths:
        existing_dir("ADAPTER", p, "a PEFT LoRA adapter folder")


def _names(text: str, option: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise UsageError(f"{option} must name at least one; got {text!r}")
    return names


def _dtype(value: str, option: str) -> Optional[str]:
    return None if choice(option, value, DTYPE_CHOICES) == "auto" else value


def _json_target(json_out: Optional[Path], outputs: List[Optional[Path]], inputs: List[Path], overwrite: bool, kind: str) -> None:
    """--json must not land in an output folder (it would change a finished, checksummed output)."""
    if json_out is None:
        return
    j = json_out.resolve()
    for out in filter(None, outputs):
        o = out.resolve()
        if j == o or j.is_relative_to(o):
            raise UsageError(f"--json {json_out}: lies inside the output folder {out}; write the JSON elsewhere")
    check_output("--json", json_out, kind=kind, inputs=inputs, overwrite=overwrite, is_file=True)


def _apart(a_opt: str, a: Optional[Path], b_opt: str, b: Optional[Path]) -> None:
    if a is None or b is None:
        return
    ra, rb = a.resolve(), b.resolve()
    if ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra):
        raise UsageError(f"{a_opt} {a} and {b_opt} {b} overlap; give two separate folders")


def _load_bank(paths: List[Path], allow_base_mismatch: bool):
    from romscale.adapters.bank import AdapterBank

    return AdapterBank.load(paths, allow_base_mismatch=allow_base_mismatch, progress=_progress())


def _check_method(method: str, option: str = "--method") -> str:
    from romscale.adapters.merge import MERGE_METHODS

    return choice(option, method, MERGE_METHODS)


def _storage_text(st: dict[str, Any]) -> str:
    return f"{st['params']:,} params, {st['bytes']:,} bytes ({st['dtype']})"


# ---- info ---------------------------------------------------------------------------------------
@app.command()
def info(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders, or one HydraOpt bundle"),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help=_MISMATCH_HELP),
) -> None:
    """Show ranks, scalings and exact storage (parameters, bytes by dtype) of adapters or a bundle."""
    for p in paths:
        existing_dir("ADAPTER", p, "a PEFT LoRA adapter folder or a HydraOpt bundle")
    _json_target(json_out, [], paths, overwrite, "adapters-info")
    from rich.table import Table

    from romscale.utils.outputs import output_kind

    if len(paths) == 1 and output_kind(paths[0]) == BUNDLE_KIND:
        from romscale.adapters.bundle import HydraBundle

        s = HydraBundle.load(paths[0]).summary()
        table = Table(title=f"HydraOpt bundle {paths[0]}")
        for col in ("tasks", "K_A", "K_B", "rank", "params", "bytes", "dtype", "of library params", "of library bytes"):
            table.add_column(col, justify="right")
        st = s["storage"]
        table.add_row(str(len(s["tasks"])), str(s["k_a"]), str(s["k_b"]), str(s["ranks"]), f"{st['params']:,}", _mib(st["bytes"]),
                      st["dtype"], f"{s['storage_fraction_params']:.3f}", f"{s['storage_fraction_bytes']:.3f}")
        _console().print(table)
        write_json(json_out, {"bundle": str(paths[0]), **s}, inputs=paths, overwrite=overwrite, kind="adapters-info")
        return
    bank = _load_bank(paths, allow_base_mismatch)
    rep = bank.info()
    table = Table(title=f"{bank.n} LoRA adapters, base {bank.base_model!r}, {len(bank.modules)} modules")
    for col in ("adapter", "ranks", "scalings", "rsLoRA", "params", "bytes", "dtypes"):
        table.add_column(col, justify="left" if col == "adapter" else "right", no_wrap=col in ("adapter", "params", "bytes"))
    for a in rep["adapters"]:
        st = a["storage"]
        table.add_row(a["name"], str(a["ranks"]), str(a["scalings"]), "yes" if a["use_rslora"] else "no", f"{st['params']:,}",
                      _mib(st["bytes"]), ", ".join(st["by_dtype"]))
    lib = rep["library_storage"]
    table.add_row("library", "", "", "", f"{lib['params']:,}", _mib(lib["bytes"]), ", ".join(lib["by_dtype"]))
    _console().print(table)
    write_json(json_out, rep, inputs=paths, overwrite=overwrite, kind="adapters-info")


# ---- methods ------------------------------------------------------------------------------------
@app.command()
def methods() -> None:
    """List the registered merge methods, their family and their PEFT equivalent."""
    from rich.table import Table

    from romscale.adapters.merge import MERGE_METHODS

    table = Table(title="merge methods")
    table.add_column("name", no_wrap=True)
    for col in ("family", "PEFT type", "density", "random", "weights", "what"):
        table.add_column(col)
    for name, m in MERGE_METHODS.items():
        table.add_row(name, m.family, m.peft_name or "-", "yes" if m.uses_density else "", "yes" if m.random else "",
                      "1/N" if m.default_weight == "mean" else "1", m.description)
    _console().print(table)


# ---- merge --------------------------------------------------------------------------------------
@app.command()
def merge(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders to merge"),
    method: str = typer.Option(..., "--method", "-m", help="merge method (see `romscale adapters methods`)"),
    out: Path = out_option(help="output PEFT adapter folder (a new folder, or a romscale peft-adapter with --overwrite)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated weights, one per adapter (default: the method's)"),
    density: float = typer.Option(0.5, "--density", help="fraction in (0, 1] kept by TIES / DARE / magnitude pruning"),
    rank: Optional[int] = typer.Option(None, "--rank", help="output rank of truncated update-space merges (default: max input rank)"),
    seed: int = seed_option(),
    rng: str = typer.Option("fast", "--rng", help="update-space DARE masks: fast | torch (PEFT's stream; A/B merges always use it)"),
    knots_inner: str = typer.Option("ties", "--knots-inner", help="KnOTS coordinate merge: ties | linear"),
    dtype: str = typer.Option("auto", "--dtype", help=f"dtype of the written factors: {_DTYPE_HELP}"),
    overwrite: bool = overwrite_option(),
    json_out: Optional[Path] = json_option(),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help=_MISMATCH_HELP),
) -> None:
    """Merge N adapters into one standard PEFT LoRA adapter.

    DARE masks are drawn module by module in the model's order; with the torch stream (A/B methods,
    or --rng torch) `--seed S` gives PEFT's masks for `torch.manual_seed(S); add_weighted_adapter(...)`."""
    in_range("--density", density, 0.0, 1.0, low_open=True)
    if rank is not None:
        at_least("--rank", rank, 1)
    choice("--rng", rng, ("fast", "torch"))
    choice("--knots-inner", knots_inner, ("ties", "linear"))
    out_dtype = _dtype(dtype, "--dtype")
    w = _floats(weights, "--weights")
    _per_input("--weights", w, paths)
    _adapter_dirs(paths)
    check_output("--out", out, kind=ADAPTER_KIND, inputs=paths, overwrite=overwrite)
    _json_target(json_out, [out], paths, overwrite, "adapters-merge")
    _check_method(method)

    from romscale.adapters.merge import MergeOptions, merge_adapters
    from romscale.adapters.peft_io import write_peft_adapter

    bank = _load_bank(paths, allow_base_mismatch)
    opts = MergeOptions(weights=w, density=density, rank=rank, seed=seed, rng=rng, knots_inner=knots_inner, dtype=out_dtype)  # type: ignore[arg-type]
    res = merge_adapters(bank, method, opts, name=out.name, progress=_progress())
    write_peft_adapter(res.adapter, out, overwrite=overwrite, inputs=paths, what="--out")
    summary = {"output": str(out), "inputs": [str(p) for p in paths], **res.summary(bank.storage())}
    _console().print(f"{method} ({res.family} family) -> {out}: {_storage_text(summary['storage'])}; "
                     f"{summary['storage_fraction_bytes']:.3f} of the library's bytes, {summary['storage_fraction_params']:.3f} "
                     f"of its params; {res.seconds:.1f} s")
    write_json(json_out, summary, inputs=paths, overwrite=overwrite, kind="adapters-merge")


# ---- hydraopt -----------------------------------------------------------------------------------
def _read_examples(path: Path) -> dict[str, list]:
    """The examples file: task -> non-empty list of texts or token id lists (checked before loading)."""
    from romscale.utils.outputs import read_json

    data = read_json(path, UsageError)
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--examples {path}: expected a JSON object task -> list of examples (texts or token id lists)")
    for task, exs in data.items():
        if not isinstance(exs, list) or not exs:
            raise UsageError(f"--examples {path}: task {task!r} needs a non-empty list of examples")
        for ex in exs:
            ids_ok = isinstance(ex, list) and ex and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ex)
            if not (isinstance(ex, str) and ex) and not ids_ok:
                raise UsageError(f"--examples {path}: task {task!r}: an example must be a non-empty text or a list of token ids; got {ex!r:.60}")
    return data


def _tokenize(path: Path, data: dict[str, list], tasks: list[str], tokenizer, vocab: int) -> dict[str, list[list[int]]]:
    unknown = sorted(set(data) - set(tasks))
    if unknown:
        raise UsageError(f"--examples {path}: examples for unknown tasks {unknown}; tasks are {tasks}")
    out = {}
    for task, exs in data.items():
        ids = []
        for ex in exs:
            if isinstance(ex, str):
                if tokenizer is None:
                    raise UsageError(f"--examples {path}: task {task!r} has texts but --base-model has no tokenizer; give token id lists")
                ex = list(tokenizer(ex)["input_ids"])
            if max(ex) >= vocab:
                raise UsageError(f"--examples {path}: task {task!r} has token id {max(ex)}, outside the base model's vocabulary of {vocab}")
            ids.append(ex)
        out[task] = ids
    return out


def _load_base_model(path: Path):
    """romscale.models.load_causal_lm, with transformers' progress bars only on a terminal."""
    from transformers.utils import logging as hf_logging

    from romscale.models import load_causal_lm

    shown = hf_logging.is_progress_bar_enabled()
    if not _progress():
        hf_logging.disable_progress_bar()
    try:
        return load_causal_lm(path, option="--base-model")
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _structures(text: str) -> Any:
    if text.strip() == "auto":
        return "auto"
    trees = _names(text, "--structures")
    for t in trees:
        choice("--structures", t, ("a", "b"))
    return tuple(dict.fromkeys(trees))


def _check_fit_options(paths, storage, storage_unit, k_a, k_b, rank, rank_multipliers, structures, grouping, task_weights):
    """The fit's options, checked; returns (rank multipliers, structures, task weights)."""
    in_range("--storage", storage, 0.0, 1.0, low_open=True)
    choice("--storage-unit", storage_unit, ("bytes", "params"))
    for opt, v in (("--k-a", k_a), ("--k-b", k_b), ("--rank", rank)):
        if v is not None:
            at_least(opt, v, 1)
    if rank is not None and k_a is None and k_b is None:
        raise UsageError("--rank sets the shared rank of an explicit --k-a/--k-b configuration; with --storage use --rank-multipliers")
    mults = _floats(rank_multipliers, "--rank-multipliers")
    if not mults or any(m <= 0 for m in mults):
        raise UsageError(f"--rank-multipliers must be positive numbers; got {rank_multipliers!r}")
    trees = _structures(structures)
    choice("--grouping", grouping, ("nested", "independent"))
    tw = _floats(task_weights, "--task-weights")
    _per_input("--task-weights", tw, paths)
    if tw is not None and any(x < 0 for x in tw):
        raise UsageError(f"--task-weights must be non-negative; got {task_weights!r}")
    return mults, trees, tw


def _check_examples(examples: Optional[Path], base_model: Optional[Path]) -> list[Path]:
    """--examples and --base-model go together; returns them (inputs no output may touch)."""
    if examples is None and base_model is None:
        return []
    if base_model is None:
        raise UsageError("--examples needs --base-model (the adapters' base model, to run the examples through)")
    if examples is None:
        raise UsageError("--base-model is only used with --examples (the data-aware term); give both or neither")
    if not examples.is_file():
        raise UsageError(f"--examples {examples}: is not a file; expected a JSON file")
    if not base_model.exists():
        raise UsageError(f"--base-model {base_model}: does not exist; expected an HF model folder or a GGUF file/folder")
    return [examples, base_model]


@app.command()
def hydraopt(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders"),
    out: Path = out_option(help="bundle folder to write (a new folder, or a romscale hydraopt-bundle with --overwrite)"),
    storage: float = typer.Option(0.5, "--storage", help="target fraction in (0, 1] of the library's bytes (see --storage-unit)"),
    storage_unit: str = typer.Option("bytes", "--storage-unit", help="what --storage is a fraction of: bytes | params"),
    k_a: Optional[int] = typer.Option(None, "--k-a", help="explicit number of shared A per module (instead of --storage)"),
    k_b: Optional[int] = typer.Option(None, "--k-b", help="explicit number of shared B per module (instead of --storage)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="explicit shared rank (with --k-a/--k-b)"),
    rank_multipliers: str = typer.Option("1,1.5,2", "--rank-multipliers", help="shared-rank candidates for --storage, as multiples of r"),
    structures: str = typer.Option("auto", "--structures", help="auto (share the more similar side), or a and/or b: a = B groups inside A groups, b = the reverse"),
    grouping: str = typer.Option("nested", "--grouping", help="with --k-a/--k-b: nested (closed form) | independent (ALS)"),
    task_weights: Optional[str] = typer.Option(None, "--task-weights", help="comma-separated non-negative task weights, one per adapter"),
    examples: Optional[Path] = typer.Option(None, "--examples", help="JSON task -> examples (texts or token ids) for the data-aware term"),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="the adapters' base model: HF folder or GGUF file/folder (needed with --examples)"),
    data_weight: float = typer.Option(0.5, "--data-weight", help="weight in [0, 1] of the data-aware term (with --examples)"),
    factor_dtype: str = typer.Option("auto", "--factor-dtype", help=f"dtype of the stored shared factors: {_DTYPE_HELP}"),
    export_dir: Optional[Path] = typer.Option(None, "--export-dir", help="also write every task as a PEFT adapter under this folder (one output, kind peft-adapter-set)"),
    overwrite: bool = overwrite_option(),
    json_out: Optional[Path] = json_option(),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help=_MISMATCH_HELP),
) -> None:
    """Fit HydraOpt shared factors to a storage target (or explicit K_A, K_B) and write a bundle."""
    mults, trees, tw = _check_fit_options(paths, storage, storage_unit, k_a, k_b, rank, rank_multipliers, structures, grouping, task_weights)
    in_range("--data-weight", data_weight, 0.0, 1.0)
    fdtype = _dtype(factor_dtype, "--factor-dtype")
    _adapter_dirs(paths)
    inputs = [*paths, *_check_examples(examples, base_model)]
    _apart("--out", out, "--export-dir", export_dir)
    check_output("--out", out, kind=BUNDLE_KIND, inputs=inputs, overwrite=overwrite)
    check_output("--export-dir", export_dir, kind=SET_KIND, inputs=inputs, overwrite=overwrite)
    _json_target(json_out, [out, export_dir], inputs, overwrite, "adapters-hydraopt")
    raw_examples = _read_examples(examples) if examples is not None else None

    from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt

    bank = _load_bank(paths, allow_base_mismatch)
    factors = None
    if raw_examples is not None:
        from romscale.adapters.activations import collect_input_factors

        model, tokenizer = _load_base_model(base_model)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = _tokenize(examples, raw_examples, bank.names, tokenizer, vocab)
        factors = collect_input_factors(model, ids, bank.modules, progress=_progress())
    cfg = HydraOptConfig(
        storage=storage, storage_unit=storage_unit, k_a=k_a, k_b=k_b, rank=rank, rank_multipliers=tuple(mults),  # type: ignore[arg-type]
        structures=trees, grouping=grouping, task_weights=tw, data_weight=data_weight if factors else 0.0,  # type: ignore[arg-type]
        factor_dtype=fdtype,
    )
    bundle = fit_hydraopt(bank, cfg, inputs=factors, progress=_progress())
    bundle.save(out, overwrite=overwrite, inputs=inputs, what="--out")
    s = bundle.summary()
    c = bundle.fit["chosen"]
    _console().print(f"HydraOpt -> {out}: tree {c['tree']}, K_A={c['k_a']}, K_B={c['k_b']}, rank x{c['rank_multiplier']}; "
                     f"{_storage_text(s['storage'])} = {s['storage_fraction_bytes']:.3f} of the library's bytes, "
                     f"{s['storage_fraction_params']:.3f} of its params; "
                     f"mean task error {sum(s['task_errors'].values()) / len(s['task_errors']):.4f}")
    if export_dir is not None:
        bundle.export_all(export_dir, overwrite=overwrite, inputs=inputs, what="--export-dir")
        _console().print(f"exported {len(bundle.tasks)} PEFT adapters under {export_dir}")
    write_json(json_out, {"bundle": str(out), "export_dir": str(export_dir) if export_dir else None, **s, "fit": bundle.fit},
               inputs=inputs, overwrite=overwrite, kind="adapters-hydraopt")


# ---- extract ------------------------------------------------------------------------------------
@app.command()
def extract(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="HydraOpt bundle folder"),
    task: Optional[str] = typer.Option(None, "--task", help="the task to materialise"),
    all_tasks: bool = typer.Option(False, "--all", help="every task, as one folder of PEFT adapters OUT/<task>/"),
    out: Path = out_option(help="output folder: a PEFT adapter (--task) or a folder of them (--all)"),
    overwrite: bool = overwrite_option(),
    json_out: Optional[Path] = json_option(),
) -> None:
    """Materialise a task (or every task) of a HydraOpt bundle as standard PEFT LoRA adapters."""
    if (task is None) == (not all_tasks):
        raise UsageError("give exactly one of --task NAME and --all")
    existing_dir("BUNDLE", bundle_path, "a HydraOpt bundle folder")
    kind = SET_KIND if all_tasks else ADAPTER_KIND
    check_output("--out", out, kind=kind, inputs=[bundle_path], overwrite=overwrite)
    _json_target(json_out, [out], [bundle_path], overwrite, "adapters-extract")
    from romscale.adapters.bundle import HydraBundle

    bundle = HydraBundle.load(bundle_path)
    if all_tasks:
        bundle.export_all(out, overwrite=overwrite, what="--out")
        tasks = bundle.tasks
    else:
        bundle.task_adapter(task)  # an unknown task fails here, naming the bundle's tasks
        bundle.export_task(task, out, overwrite=overwrite, what="--out")
        tasks = [task]
    _console().print(f"wrote {out} ({len(tasks)} PEFT adapter{'s' if len(tasks) > 1 else ''})")
    write_json(json_out, {"bundle": str(bundle_path), "output": str(out), "tasks": tasks}, inputs=[bundle_path],
               overwrite=overwrite, kind="adapters-extract")


# ---- report -------------------------------------------------------------------------------------
@app.command()
def report(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders"),
    methods_: str = typer.Option(DEFAULT_REPORT_METHODS, "--methods", help="comma-separated merge methods"),
    budgets: str = typer.Option("0.25,0.5,0.75", "--budgets", help="HydraOpt storage budgets, fractions in (0, 1] of the library (see --storage-unit)"),
    storage_unit: str = typer.Option("bytes", "--storage-unit", help="what --budgets are fractions of: bytes | params"),
    density: float = typer.Option(0.5, "--density", help="fraction in (0, 1] kept by TIES / DARE / magnitude pruning"),
    rank: Optional[int] = typer.Option(None, "--rank", help="output rank of truncated update-space merges"),
    seed: int = seed_option(),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help=_MISMATCH_HELP),
) -> None:
    """Per method and budget, each task's relative update error (no evaluation data needed)."""
    fractions = _floats(budgets, "--budgets")
    if not fractions or any(not 0 < b <= 1 for b in fractions):
        raise UsageError(f"--budgets must be fractions in (0, 1]; got {budgets!r}")
    choice("--storage-unit", storage_unit, ("bytes", "params"))
    in_range("--density", density, 0.0, 1.0, low_open=True)
    if rank is not None:
        at_least("--rank", rank, 1)
    _adapter_dirs(paths)
    _json_target(json_out, [], paths, overwrite, "adapters-report")
    names = _names(methods_, "--methods")
    for m in names:
        _check_method(m, "--methods")
    from rich.table import Table

    from romscale.adapters.hydraopt import HydraOptConfig
    from romscale.adapters.merge import MergeOptions
    from romscale.adapters.report import reconstruction_report

    bank = _load_bank(paths, allow_base_mismatch)
    rep = reconstruction_report(bank, names, fractions, merge_options=MergeOptions(density=density, rank=rank, seed=seed),
                                hydra_config=HydraOptConfig(storage_unit=storage_unit), progress=_progress())  # type: ignore[arg-type]
    table = Table(title=f"relative update error per task ({bank.n} tasks; RMS over modules)")
    for col in ("method", "family", "budget", "params", "bytes", "dtype", "of params", "of bytes", "RMS", "mean", "max"):
        table.add_column(col, justify="left" if col in ("method", "family") else "right", no_wrap=True)
    for r in rep["rows"]:
        table.add_row(r["method"], r["family"], r["budget"], f"{r['storage_params']:,}", _mib(r["storage_bytes"]), r["storage_dtype"],
                      f"{r['storage_fraction_params']:.3f}", f"{r['storage_fraction_bytes']:.3f}", f"{r['rms_error']:.4f}",
                      f"{r['mean_error']:.4f}", f"{r['max_error']:.4f}")
    console = _console()
    console.print(table)
    if rep["skipped_budgets"]:
        console.print(f"skipped budgets outside what HydraOpt can store (one shared A and B up to the library): {rep['skipped_budgets']}")
    write_json(json_out, rep, inputs=paths, overwrite=overwrite, kind="adapters-report")


# ---- train --------------------------------------------------------------------------------------
@app.command()
def train(
    bank: Path = typer.Option(..., "--bank", help="task bank folder (romscale data taskbank)"),
    base: str = typer.Option(..., "--base", help="base model: smollm2-135m-instruct, a HF folder or a .gguf file"),
    out: Path = out_option(help="adapter library folder: a new one, or a library to resume (finished tasks are skipped)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated task or subset names (default: all)"),
    rank: int = typer.Option(16, "--rank", help="LoRA rank"),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha (scaling alpha / rank)"),
    steps: int = typer.Option(200, "--steps", help="optimizer steps per task"),
    lr: float = typer.Option(5e-4, "--lr", help="peak learning rate (linear warm-up, then cosine)"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per step"),
    max_len: int = typer.Option(256, "--max-len", help="tokens per example (prompt cut at its start)"),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available) | cpu | cuda"),
    seed: int = seed_option(),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Train one LoRA per task (same seed for all: shared lora_A init); resumable per task."""
    existing_dir("--bank", bank, "a task bank folder (romscale data taskbank --out DIR)")
    at_least("--rank", rank, 1)
    at_least("--alpha", alpha, 0, strict=True)
    at_least("--steps", steps, 1)
    at_least("--lr", lr, 0, strict=True)
    at_least("--batch-size", batch_size, 1)
    at_least("--max-len", max_len, 2)
    choice("--device", device, ("auto", "cpu", "cuda"))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available to torch here; use --device cpu or auto")
    from romscale.models import PACKAGED_MODELS, resolve_model_source

    if base not in PACKAGED_MODELS:
        resolve_model_source(base, "--base")
    from romscale.adapters.library import check_library_target

    check_library_target(out, inputs=[bank], overwrite=overwrite)
    _json_target(json_out, [out], [bank], overwrite, "adapters-train")
    from romscale.adapters.train import LoraTrainConfig, train_task_adapters
    from romscale.data.taskbank import TaskBank

    tb = TaskBank.open(bank, tasks)
    cfg = LoraTrainConfig(rank=rank, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size, max_len=max_len, seed=seed, bf16=bf16,
                          device=None if device == "auto" else device)
    console = _console()
    summary = train_task_adapters(tb, base, out, cfg, progress=_progress(), overwrite=overwrite, log=console.print)
    from rich.table import Table

    table = Table(title=f"{out}: {len(summary['runs'])} task adapters (rank {rank}, {steps} steps, seed {seed})")
    for col in ("task", "steps", "seconds", "first loss", "final loss", "this run"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t, r in summary["runs"].items():
        table.add_row(t, str(r["steps"]), f"{r['seconds']:.1f}", f"{r['first_loss']:.4f}", f"{r['final_loss']:.4f}",
                      "trained" if t in summary["trained"] else "kept")
    console.print(table)
    write_json(json_out, summary, inputs=[bank], overwrite=overwrite, kind="adapters-train")


from romscale.adapters.cluster_cli import app as _cluster_app  # noqa: E402  (cluster, route)
app.add_typer(_cluster_app)

from romscale.bench.adapters_cli import benchmark as _benchmark  # noqa: E402  (the score-vs-storage benchmark)
app.command("benchmark")(_benchmark)
