"""`romscale adapters cluster` and `romscale adapters route` (mounted by romscale/adapters/cli.py).

cluster: N task LoRAs (an adapter library) -> K merged PEFT adapters and the task -> adapter map,
with any clusterer of romscale.adapters.clusterers (D2C or a baseline). route: the adapter folder
to load for a task. Only typer and romscale.cli_common are imported at the top: options are checked
before torch is imported.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

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
from romscale.errors import RomscaleError

app = typer.Typer(pretty_exceptions_enable=False)

# Kept here so that --method is checked before torch is imported; a test checks it equals CLUSTERERS.
CLUSTERER_NAMES = ("random", "kmeans", "kmeans_svd", "oracle_family", "oracle_language", "d2c")
CLUSTERS_KIND, LIBRARY_KIND, STATE_KIND = "adapter-clusters", "adapter-library", "d2c-state"
ROUTING = "routing.json"
ROUTING_FORMAT, ROUTING_VERSION = "romscale-adapter-clusters", 1


def _progress() -> bool:
    return sys.stderr.isatty()


def _task_list(text: Optional[str]) -> Optional[list[str]]:
    """--tasks as a list of names (a bank also accepts subset names in it)."""
    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise UsageError(f"--tasks must name at least one task (or a subset of the bank); got {text!r}")
    return names


def _inside(a: Path, b: Path) -> bool:
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or ra.is_relative_to(rb)


def _load_inputs(lib: Path, bank_dir: Optional[Path], tasks: Optional[list[str]]):
    """(AdapterBank of the selected tasks (default: the library's), TaskBank or None); tasks unknown to
    the bank or without an adapter in the library are refused (by TaskBank.open / load_library)."""
    from romscale.adapters.library import library_tasks, load_library

    taskbank = None
    names = tasks
    if bank_dir is not None:
        from romscale.data.taskbank import TaskBank

        # default: every task of the library, each of which the bank must know
        taskbank = TaskBank.open(bank_dir, tasks if tasks is not None else library_tasks(lib))
        names = taskbank.names
    adapters = load_library(lib, tasks=names)
    return adapters, taskbank


def _d2c_problem(adapters, taskbank, base: Path, n: int, loss_mode: str, merge_method: str, batch_size: int, bf16: bool, device: str):
    """The model-backed loss: examples checked first, then the base model loaded once."""
    import torch

    from romscale.adapters.taskloss import loss_examples, model_loss
    from romscale.eval.generate import TaskEvaluator
    from romscale.eval.slot import AdapterSlot
    from romscale.models import load_causal_lm

    try:
        loss_examples(taskbank, adapters.names, n)
    except RomscaleError as exc:  # a task without examples: a usage error naming it, before the model loads
        raise UsageError(f"--bank: {exc}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch here; use --device cpu or auto")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not _progress():  # transformers' loading bars only on a terminal, as every progress bar
        hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_causal_lm(base, option="--base")
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if tokenizer is None:
        raise UsageError(f"--base {base}: has no tokenizer; D2C's loss needs one to encode the examples")
    model.to(dev)
    # merged adapters keep the inputs' max rank, except `cat`, whose rank is the sum of its inputs'
    rank = max(adapters.max_rank(m) for m in adapters.modules) * (adapters.n if merge_method == "cat" else 1)
    targets = sorted({m.rsplit(".", 1)[-1] for m in adapters.modules})
    slot = AdapterSlot(model, target_modules=targets, rank=rank)
    evaluator = TaskEvaluator(slot.base, tokenizer, slot, batch_size=batch_size, device=dev, bf16=bf16)
    return model_loss(evaluator, taskbank, n=n, mode=loss_mode, tasks=adapters.names)  # type: ignore[arg-type]


@app.command("cluster")
def cluster(
    lib: Path = typer.Option(..., "--lib", help="adapter library: a folder of per-task PEFT LoRAs (romscale adapters train)"),
    method: str = typer.Option(..., "--method", "-m", help=f"clusterer: {' | '.join(CLUSTERER_NAMES)}"),
    k: int = typer.Option(..., "--k", help="number of merged adapters to keep (1..N)"),
    out: Path = out_option(help="output folder: cluster-0..K-1 PEFT adapters + routing.json (kind adapter-clusters)"),
    bank_dir: Optional[Path] = typer.Option(None, "--bank", help="task bank folder (families, languages, D2C's examples)"),
    base: Optional[Path] = typer.Option(None, "--base", help="base model (HF folder or GGUF) for D2C's loss"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated tasks, or a subset of the bank (default: all)"),
    n: int = typer.Option(10, "--n", help="D2C: validation examples per task in the loss"),
    iterations: int = typer.Option(1000, "--iterations", help="D2C: hill-climbing iterations T"),
    accept: str = typer.Option("moved", "--accept", help="D2C: moved (the paper: the moved task's loss) | total (both clusters' summed loss)"),
    merge_method: str = typer.Option("ties", "--merge", help="merge method inside the loop and for the final clusters (romscale adapters methods)"),
    density: float = typer.Option(0.5, "--density", help="fraction in (0, 1] kept by TIES / DARE / magnitude pruning"),
    loss_mode: str = typer.Option("factored", "--loss-mode", help="D2C: factored (LoRA slot) | plain (dense update added to the weights)"),
    state: Optional[Path] = typer.Option(None, "--state", help="D2C: state file, written as it runs; an existing one is resumed"),
    batch_size: int = typer.Option(16, "--batch-size", help="D2C: sequences per forward in the loss"),
    bf16: bool = typer.Option(False, "--bf16", help="D2C: bf16 autocast in the loss"),
    device: str = typer.Option("auto", "--device", help="D2C: auto | cpu | cuda"),
    no_cache: bool = typer.Option(False, "--no-cache", help="D2C: recompute every merge and loss (for checking the caches)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="D2C: torch threads for the loss (default: torch's; on a busy CPU 1 can be faster)"),
    seed: int = seed_option(),
    json_out: Optional[Path] = json_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Group N task LoRAs into K clusters, merge each, and write the K adapters + the task map."""
    t_all = time.perf_counter()
    choice("--method", method, CLUSTERER_NAMES)
    at_least("--k", k, 1)
    at_least("--n", n, 1)
    at_least("--iterations", iterations, 0)
    at_least("--batch-size", batch_size, 1)
    choice("--accept", accept, ("moved", "total"))
    choice("--loss-mode", loss_mode, ("factored", "plain"))
    choice("--device", device, ("auto", "cpu", "cuda"))
    in_range("--density", density, 0.0, 1.0, low_open=True)
    if threads is not None:
        at_least("--threads", threads, 1)
    task_sel = _task_list(tasks)
    existing_dir("--lib", lib, "an adapter library folder")
    if bank_dir is not None:
        existing_dir("--bank", bank_dir, "a task bank folder")
    if method == "d2c" and (bank_dir is None or base is None):
        raise UsageError("--method d2c needs --bank (the tasks' examples) and --base (the base model the LoRAs were trained on)")
    if state is not None and method != "d2c":
        raise UsageError(f"--state is D2C's resumable state; --method {method} does not use it")
    if method.startswith("oracle_") and bank_dir is None:
        raise UsageError(f"--method {method} needs --bank (it reads each task's family and language there)")
    if base is not None and not base.exists():
        raise UsageError(f"--base {base}: does not exist; expected an HF model folder or a GGUF file")
    inputs = [p for p in (lib, bank_dir, base) if p is not None]
    check_output("--out", out, kind=CLUSTERS_KIND, inputs=inputs, overwrite=overwrite)
    for opt, f in (("--json", json_out), ("--state", state)):
        if f is not None and _inside(f, out):
            raise UsageError(f"{opt} {f}: lies inside the output folder {out}; write it elsewhere")
    check_output("--json", json_out, kind="adapters-cluster", inputs=inputs, overwrite=overwrite, is_file=True)
    check_output("--state", state, kind=STATE_KIND, inputs=inputs, overwrite=True, is_file=True)

    from romscale.adapters.clusterers import (
        ClusterProblem,
        cluster_merger,
        get_clusterer,
    )
    from romscale.adapters.merge import MERGE_METHODS, MergeOptions

    choice("--merge", merge_method, MERGE_METHODS)
    t0 = time.perf_counter()
    adapters, taskbank = _load_inputs(lib, bank_dir, task_sel)
    if k > adapters.n:
        raise UsageError(f"--k {k}: more clusters than tasks ({adapters.n} in {lib}); K must be in 1..{adapters.n}")
    opts = MergeOptions(density=density, seed=seed)
    merge = cluster_merger(adapters, merge_method, opts)
    families = {t.name: t.family for t in taskbank.tasks} if taskbank is not None else {}
    languages = {t.name: t.language for t in taskbank.tasks} if taskbank is not None else {}
    problem = ClusterProblem(adapters, families=families, languages=languages, merge=merge)
    options: dict[str, Any] = {}
    if method == "d2c":
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        problem.loss = _d2c_problem(adapters, taskbank, base, n, loss_mode, merge_method, batch_size, bf16, device)  # type: ignore[arg-type]
        tag = {"merge_options": opts.to_dict(), "loss_mode": loss_mode, "bf16": bf16,
               "lib": str(lib.resolve()), "base": str(Path(base).resolve())}  # type: ignore[arg-type]
        options = {"iterations": iterations, "accept": accept, "merge": merge_method, "n": n, "cache": not no_cache, "tag": tag,
                   "state": state, "progress": _progress()}
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    part = get_clusterer(method).cluster(problem, k, seed, **options)
    cluster_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clusters = part.clusters()
    merged = part.adapters if part.adapters is not None else {i: merge(m) for i, m in enumerate(clusters)}
    merge_s = time.perf_counter() - t0

    from rich.console import Console
    from rich.table import Table

    from romscale.adapters.peft_io import write_adapter_files
    from romscale.utils.outputs import output_dir

    info = dict(part.info)
    routing = {
        "format": ROUTING_FORMAT,
        "version": ROUTING_VERSION,
        "method": method,
        "k": k,
        "n_tasks": adapters.n,
        "seed": seed,
        "tasks": {t: f"cluster-{part[t]}" for t in adapters.names},
        "clusters": [{"name": f"cluster-{i}", "members": list(m),
                      "families": sorted({families[t] for t in m}) if families else None,
                      "languages": sorted({languages[t] for t in m}) if languages else None} for i, m in enumerate(clusters)],
        "options": {"merge": merge_method, "merge_options": opts.to_dict(), "singleton": "identity",
                    **({"n": n, "iterations": iterations, "accept": accept, "loss_mode": loss_mode, "cache": not no_cache,
                        "bf16": bf16} if method == "d2c" else {})},
        "inputs": {"lib": str(lib), "bank": str(bank_dir) if bank_dir else None, "base": str(base) if base else None},
        "counts": info.pop("counts", {"merges": len(clusters)}),
        "timings_s": {"load": round(load_s, 4), "cluster": round(cluster_s, 4), "final_merge": round(merge_s, 4),
                      "method": info.pop("timings_s", None)},
        "method_info": info,
    }
    import json

    with output_dir(out, kind=CLUSTERS_KIND, inputs=inputs, overwrite=overwrite, what="--out") as o:
        for i in range(k):
            write_adapter_files(merged[i], o.path / f"cluster-{i}")
        routing["timings_s"]["total"] = round(time.perf_counter() - t_all, 4)
        (o.path / ROUTING).write_text(json.dumps(routing, indent=2) + "\n", encoding="utf-8")
        o.meta["clusters"] = {"method": method, "k": k, "tasks": adapters.n}
    table = Table(title=f"{method}: {adapters.n} tasks -> {k} adapters ({k / adapters.n:.1%} of the adapters)")
    table.add_column("adapter", no_wrap=True)
    table.add_column("tasks")
    for i, m in enumerate(clusters):
        table.add_row(f"cluster-{i}", ", ".join(m))
    console = Console()
    console.print(table)
    extra = ""
    if method == "d2c":
        c, ts = routing["counts"], routing["timings_s"]["method"]
        extra = (f"; {info['accepted_moves']} of {info['iterations_done']} moves kept, {c['merges']} merges, "
                 f"{c['loss_evals']} task losses in {c['loss_calls']} calls; merge {ts['merge_s']:.1f} s, loss {ts['loss_s']:.1f} s, "
                 f"other {ts['other_s']:.1f} s")
    console.print(f"wrote {out} in {routing['timings_s']['total']:.1f} s{extra}")
    write_json(json_out, {"output": str(out), **routing}, inputs=inputs, overwrite=overwrite, kind="adapters-cluster")


@app.command("route")
def route(
    clusters_dir: Path = typer.Argument(..., metavar="OUT", help="output of `romscale adapters cluster`"),
    task: str = typer.Argument(..., help="task name"),
) -> None:
    """Print the adapter folder to load for TASK."""
    existing_dir("OUT", clusters_dir, "an adapter-clusters folder (romscale adapters cluster --out)")
    from romscale.errors import AdapterError
    from romscale.utils.outputs import member, read_json, read_manifest

    read_manifest(clusters_dir, CLUSTERS_KIND, AdapterError)
    r = read_json(member(clusters_dir, ROUTING, AdapterError, str(clusters_dir)), AdapterError)
    if not isinstance(r, dict) or r.get("format") != ROUTING_FORMAT or not isinstance(r.get("tasks"), dict):
        raise AdapterError(f"{clusters_dir / ROUTING}: not a romscale routing file (format {ROUTING_FORMAT!r} with a 'tasks' map)")
    if task not in r["tasks"]:
        raise UsageError(f"TASK {task!r} is not routed by {clusters_dir}; tasks: {', '.join(sorted(r['tasks']))}")
    name = r["tasks"][task]
    member(clusters_dir, f"{name}/adapter_config.json", AdapterError, str(clusters_dir / ROUTING))
    print(clusters_dir / name)
