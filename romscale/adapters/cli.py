"""`romscale adapters ...` commands (thin: parse, call the library, print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from romscale.errors import RomscaleError

app = typer.Typer(help="Adapter libraries: inspect, merge, HydraOpt, report.", no_args_is_help=True)
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None or text == "":
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RomscaleError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _write_json(path: Optional[Path], obj: Any) -> None:
    if path is None:
        return
    from romscale.utils.atomic import atomic_write_json

    atomic_write_json(path, obj)
    console.print(f"wrote {path}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _load_bank(paths: List[Path], allow_base_mismatch: bool):
    from romscale.adapters.bank import AdapterBank

    return AdapterBank.load(paths, allow_base_mismatch=allow_base_mismatch, progress=True)


@app.command()
def info(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders (or one HydraOpt bundle)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report (per module) here"),
    allow_base_mismatch: bool = typer.Option(False, help="accept different base_model_name_or_path values"),
) -> None:
    """Show ranks, scalings and exact storage (parameters, bytes by dtype) of adapters or a bundle."""
    try:
        from romscale.adapters.bundle import MANIFEST, HydraBundle

        if len(paths) == 1 and (paths[0] / MANIFEST).is_file():
            b = HydraBundle.load(paths[0])
            s = b.summary()
            table = Table(title=f"HydraOpt bundle {paths[0]}")
            for col in ("tasks", "K_A", "K_B", "rank", "params", "bytes", "of library"):
                table.add_column(col, justify="right")
            table.add_row(str(len(s["tasks"])), str(s["k_a"]), str(s["k_b"]), str(s["ranks"]), f"{s['storage']['params']:,}",
                          _mib(s["storage"]["bytes"]), f"{s['storage_fraction_params']:.3f}")
            console.print(table)
            _write_json(json_out, {"bundle": str(paths[0]), **s})
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
        table.add_row("[bold]library[/]", "", "", "", f"{lib['params']:,}", _mib(lib["bytes"]), ", ".join(lib["by_dtype"]))
        console.print(table)
        _write_json(json_out, rep)
    except RomscaleError as exc:
        _fail(exc)


@app.command()
def merge(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders to merge"),
    method: str = typer.Option(..., "--method", "-m", help="merge method (see `romscale adapters methods`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output PEFT adapter folder"),
    weights: Optional[str] = typer.Option(None, help="comma-separated weights (default: the method's)"),
    density: float = typer.Option(0.5, help="fraction kept by TIES / DARE / magnitude pruning"),
    rank: Optional[int] = typer.Option(None, help="output rank of truncated update-space merges (default: max input rank)"),
    seed: int = typer.Option(0, help="seed of DARE's random drops"),
    rng: str = typer.Option("fast", help="update-space DARE masks: fast | torch (PEFT's stream)"),
    knots_inner: str = typer.Option("ties", help="KnOTS coordinate merge: ties | linear"),
    dtype: str = typer.Option("float32", help="dtype of the written factors: float32 | float16 | bfloat16"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write a JSON summary here"),
    allow_base_mismatch: bool = typer.Option(False),
) -> None:
    """Merge N adapters into one standard PEFT LoRA adapter."""
    try:
        import torch

        from romscale.adapters.merge import MergeOptions, merge_adapters
        from romscale.adapters.peft_io import write_peft_adapter

        tdtype = getattr(torch, dtype, None)
        if not isinstance(tdtype, torch.dtype) or not tdtype.is_floating_point:
            raise RomscaleError(f"--dtype must be a floating dtype name, got {dtype!r}")
        bank = _load_bank(paths, allow_base_mismatch)
        opts = MergeOptions(weights=_floats(weights, "--weights"), density=density, rank=rank, seed=seed, rng=rng, knots_inner=knots_inner)
        if rng not in ("fast", "torch") or knots_inner not in ("ties", "linear"):
            raise RomscaleError("--rng must be fast|torch and --knots-inner ties|linear")
        res = merge_adapters(bank, method, opts, name=out.name, progress=True)
        write_peft_adapter(res.adapter, out, dtype=tdtype, overwrite=overwrite, protect=bank.sources)
        summary = {"output": str(out), "inputs": [str(p) for p in paths], **res.summary(bank.storage())}
        console.print(f"{method} ({res.family} family) -> {out}: {res.storage.params:,} params "
                      f"({summary['storage_fraction']:.3f} of the library), {res.seconds:.1f} s")
        _write_json(json_out, summary)
    except RomscaleError as exc:
        _fail(exc)


@app.command()
def methods() -> None:
    """List the registered merge methods, their family and their PEFT equivalent."""
    from romscale.adapters.merge import MERGE_METHODS

    table = Table(title="merge methods")
    table.add_column("name", no_wrap=True)
    for col in ("family", "PEFT type", "density", "random", "weights", "what"):
        table.add_column(col)
    for name, m in MERGE_METHODS.items():
        table.add_row(name, m.family, m.peft_name or "-", "yes" if m.uses_density else "", "yes" if m.random else "",
                      "1/N" if m.default_weight == "mean" else "1", m.description)
    console.print(table)


def _examples(path: Path, base_model: Path, tasks: list[str]) -> dict[str, list[list[int]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RomscaleError(f"{path}: cannot read examples JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise RomscaleError(f"{path}: expected an object task -> list of examples (texts or token id lists)")
    unknown = sorted(set(data) - set(tasks))
    if unknown:
        raise RomscaleError(f"{path}: examples for unknown tasks {unknown}; tasks are {tasks}")
    tok = None
    out = {}
    for task, exs in data.items():
        ids = []
        for ex in exs:
            if isinstance(ex, str):
                if tok is None:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
                ids.append(tok(ex)["input_ids"])
            else:
                ids.append([int(x) for x in ex])
        out[task] = ids
    return out


@app.command()
def hydraopt(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders"),
    out: Path = typer.Option(..., "--out", "-o", help="bundle folder to write"),
    storage: float = typer.Option(0.5, help="target fraction of the library's parameters"),
    k_a: Optional[int] = typer.Option(None, "--k-a", help="explicit number of shared A per module (instead of --storage)"),
    k_b: Optional[int] = typer.Option(None, "--k-b", help="explicit number of shared B per module"),
    rank: Optional[int] = typer.Option(None, help="explicit shared rank (with --k-a/--k-b)"),
    rank_multipliers: str = typer.Option("1,1.5,2", help="shared-rank candidates for --storage, as multiples of r"),
    structures: str = typer.Option("auto", help="auto (share the more similar side), or a and/or b: a = B groups inside A groups, b = the reverse"),
    grouping: str = typer.Option("nested", help="with --k-a/--k-b: nested (closed form) | independent (ALS)"),
    task_weights: Optional[str] = typer.Option(None, help="comma-separated task weights in the fit"),
    examples: Optional[Path] = typer.Option(None, help="JSON task -> examples (texts or token ids) for the data-aware term"),
    base_model: Optional[Path] = typer.Option(None, help="local base model folder (needed with --examples)"),
    data_weight: float = typer.Option(0.5, help="weight of the data-aware term when --examples is given"),
    factor_dtype: str = typer.Option("float32", help="dtype of the stored shared factors"),
    export_dir: Optional[Path] = typer.Option(None, help="also write every task as a PEFT adapter under this folder"),
    overwrite: bool = typer.Option(False),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    allow_base_mismatch: bool = typer.Option(False),
) -> None:
    """Fit HydraOpt shared factors to a storage target (or explicit K_A, K_B) and write a bundle."""
    try:
        from romscale.adapters.hydraopt import HydraOptConfig, fit_hydraopt

        bank = _load_bank(paths, allow_base_mismatch)
        inputs = None
        if examples is not None:
            if base_model is None:
                raise RomscaleError("--examples needs --base-model (a local folder of the adapters' base model)")
            from transformers import AutoModelForCausalLM

            from romscale.adapters.activations import collect_input_factors

            model = AutoModelForCausalLM.from_pretrained(str(base_model), local_files_only=True)
            inputs = collect_input_factors(model, _examples(examples, base_model, bank.names), bank.modules, progress=True)
        cfg = HydraOptConfig(
            storage=storage, k_a=k_a, k_b=k_b, rank=rank,
            rank_multipliers=tuple(_floats(rank_multipliers, "--rank-multipliers") or (1.0,)),
            structures="auto" if structures.strip() == "auto" else tuple(s.strip() for s in structures.split(",") if s.strip()),  # type: ignore[arg-type]
            grouping=grouping,  # type: ignore[arg-type]
            task_weights=_floats(task_weights, "--task-weights"),
            data_weight=data_weight if inputs else 0.0,
            factor_dtype=factor_dtype,
        )
        bundle = fit_hydraopt(bank, cfg, inputs=inputs, progress=True)
        bundle.save(out, overwrite=overwrite, protect=bank.sources)
        s = bundle.summary()
        c = bundle.fit["chosen"]
        console.print(f"HydraOpt -> {out}: tree {c['tree']}, K_A={c['k_a']}, K_B={c['k_b']}, rank x{c['rank_multiplier']}; "
                      f"{s['storage']['params']:,} params = {s['storage_fraction_params']:.3f} of the library; "
                      f"mean task error {sum(s['task_errors'].values()) / len(s['task_errors']):.4f}")
        if export_dir is not None:
            for t in bundle.tasks:
                bundle.export_task(t, export_dir / t, overwrite=overwrite)
            console.print(f"exported {len(bundle.tasks)} PEFT adapters under {export_dir}")
        _write_json(json_out, {"bundle": str(out), **s, "fit": bundle.fit})
    except RomscaleError as exc:
        _fail(exc)


@app.command()
def export(
    bundle_path: Path = typer.Argument(..., help="HydraOpt bundle folder"),
    task: str = typer.Argument(..., help="task name"),
    out: Path = typer.Argument(..., help="output PEFT adapter folder"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Materialise one task of a HydraOpt bundle as a standard PEFT LoRA adapter."""
    try:
        from romscale.adapters.bundle import HydraBundle

        HydraBundle.load(bundle_path).export_task(task, out, overwrite=overwrite)
        console.print(f"wrote {out}")
    except RomscaleError as exc:
        _fail(exc)


@app.command()
def report(
    paths: List[Path] = typer.Argument(..., help="PEFT LoRA folders"),
    methods_: str = typer.Option(",".join(("task_arithmetic", "ties", "dare_ties", "magnitude_prune", "knots", "linear_ab", "ties_ab")), "--methods"),
    budgets: str = typer.Option("0.25,0.5,0.75", help="HydraOpt storage budgets (fractions of the library)"),
    density: float = typer.Option(0.5),
    rank: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    allow_base_mismatch: bool = typer.Option(False),
) -> None:
    """Per method and budget, each task's relative update error (no evaluation data needed)."""
    try:
        from romscale.adapters.merge import MergeOptions
        from romscale.adapters.report import check_budgets, reconstruction_report

        bank = _load_bank(paths, allow_base_mismatch)
        rep = reconstruction_report(
            bank, [m for m in methods_.split(",") if m], check_budgets(_floats(budgets, "--budgets") or []),
            merge_options=MergeOptions(density=density, rank=rank, seed=seed), progress=True,
        )
        table = Table(title=f"relative update error per task ({bank.n} tasks; RMS over modules)")
        for col in ("method", "family", "budget", "storage", "RMS", "mean", "max"):
            table.add_column(col, justify="left" if col in ("method", "family") else "right", no_wrap=True)
        for r in rep["rows"]:
            table.add_row(r["method"], r["family"], r["budget"], f"{r['storage_fraction']:.3f}", f"{r['rms_error']:.4f}",
                          f"{r['mean_error']:.4f}", f"{r['max_error']:.4f}")
        console.print(table)
        if rep["skipped_budgets"]:
            console.print(f"skipped budgets below the smallest HydraOpt configuration: {rep['skipped_budgets']}")
        _write_json(json_out, rep)
    except RomscaleError as exc:
        _fail(exc)
