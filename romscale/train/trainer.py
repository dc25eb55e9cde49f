"""The trainer: one accelerate loop for causal LMs, driven by a TrainConfig.

The same code runs on one CPU, one GPU, or N processes under `accelerate launch` / `torchrun` (DDP;
FSDP through accelerate's config, docs/training.md). Each optimiser step consumes the next global
batch of the token stream (romscale.train.stream); process r's micro-batch m is its own slice of it,
so 1 process x grad_accum 2 x batch 4, 2 processes x batch 4 and 1 process x batch 8 all compute
the same mean gradient. Gradients are accumulated under `accelerator.no_sync` (one all-reduce per
step), clipped, then AdamW steps; the learning rate follows `lr_at` (the one schedule formula).
Checkpoints (romscale.train.checkpoint) carry everything the next step depends on, so a run killed
at any instant and resumed reproduces the uninterrupted run's metrics exactly (on CPU, fp32).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from romscale.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up over warmup_steps to the peak,
    then half a cosine from the peak to peak x min_lr_ratio, reached at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - 1 - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """accelerate's mixed_precision for a config value. auto = bf16 autocast on a GPU, and on a CPU
    with native bf16 (measured faster than fp32 on the development CPU, an AMD EPYC with
    AVX512-BF16: docs/training.md); fp32 on other CPUs, where bf16 is emulated."""
    if precision == "auto":
        return "bf16" if on_gpu or cpu_has_native_bf16() else "no"
    return {"bf16": "bf16", "fp32": "no"}[precision]


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def evaluate(model, batches: list, accelerator) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation batches of every process."""
    import torch

    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for x in batches:
            x = x.to(accelerator.device)
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (x.shape[1] - 1)
            total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=total.device)])
    total = accelerator.reduce(total, "sum")
    model.train(was)
    return float(total[0] / total[1])


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the model `cfg` describes into the run folder `out` (romscale.train.checkpoint's layout).

    resume: continue from out/checkpoint (the config must be the same, apart from progress / out);
    a run folder without a checkpoint yet starts again. overwrite: start again in a run folder
    romscale wrote. Returns the summary also written to out/run.json."""
    import torch
    from accelerate import Accelerator

    from romscale.data.corpus import open_corpus
    from romscale.train import checkpoint as ck
    from romscale.train.build import build_model, param_groups
    from romscale.train.stream import TokenBlocks, TrainStream, val_batches
    from romscale.utils.outputs import write_json_output

    out = Path(out).absolute()
    corpus_dir = Path(cfg.data.corpus)
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.precision, on_gpu), cpu=not on_gpu)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    # Every process checks the run folder (a shared file system is assumed across nodes); only the
    # main process changes it.
    status = ck.run_status(out, resume=resume, overwrite=overwrite, inputs=[corpus_dir])
    corpus = open_corpus(corpus_dir, verify=main)
    train_blocks = TokenBlocks(corpus.train, cfg.data.seq_len, "train")
    val_blocks = TokenBlocks(corpus.val, cfg.data.seq_len, "val")
    accelerator.wait_for_everyone()

    state: dict[str, Any] | None = None
    if status == "resume":
        state = ck.read_state(out / ck.CHECKPOINT_DIR)
        _check_same_config(cfg, state["config"], out / ck.CHECKPOINT_DIR / "state.json")
    gb = cfg.global_batch(world)
    if state is not None and state.get("global_batch") != gb:
        raise ck.CheckpointError(f"{out / ck.CHECKPOINT_DIR}: saved with a global batch of {state.get('global_batch')} sequences, "
                                 f"this launch has {gb} (batch_size x grad_accum x {world} processes); keep the global batch to resume")

    model = build_model(cfg, corpus.vocab_size, corpus.eos_id)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_tables), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    # The scheduler is not passed to accelerator.prepare: its wrapper steps once per process.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.optim.lr)
    stream = TrainStream(train_blocks, cfg.seed)
    metrics: list[dict[str, Any]] = []
    window = {"loss_sum": 0.0, "steps": 0, "step_seconds": 0.0}
    start, seconds = 0, 0.0
    if state is not None:
        folder = out / ck.CHECKPOINT_DIR
        ck.load_model_weights(model, folder)
        stream.restore(state["stream"], str(folder / "state.json"))
        start, seconds, window = int(state["step"]), float(state["seconds"]), dict(state["metrics_window"])
        metrics = ck.read_metrics(folder)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if status == "restart":
            ck.clear_run(out)
        ck.write_metrics(out, metrics)
        write_json_output(out / ck.RUN_FILE, {"status": "running", "config": cfg.to_dict(), "step": start, "processes": world},
                          kind=ck.RUN_KIND, overwrite=True, inputs=[corpus_dir], what="run.json")
        log(f"{'resuming at step ' + str(start) if start else 'training'}: {cfg.steps} steps x {gb} sequences x "
            f"{cfg.data.seq_len} tokens on {world} process(es), {accelerator.device}, precision {accelerator.mixed_precision}")
    accelerator.wait_for_everyone()

    aliases = ck.tied_aliases(model)
    hf_config = model.config
    model, opt = accelerator.prepare(model, opt)
    if state is not None:  # after prepare: the optimizer state is loaded by parameter name, sharded as the model is
        ck.load_training_state(out / ck.CHECKPOINT_DIR, state, model, opt.optimizer, sched, rank)
    vals = val_batches(val_blocks, cfg.data.val_blocks, cfg.data.val_batch_size, rank, world)
    model.train()
    bar = _bar(cfg.steps, start, cfg.progress and main)
    t_run = time.perf_counter() - seconds
    last_val = state.get("last_val_loss") if state else None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = sched.get_last_lr()[0]
        step_loss, grad_norm = _step(model, opt, sched, stream, accelerator, cfg, gb)
        window["loss_sum"] += step_loss
        window["steps"] += 1
        window["step_seconds"] += time.perf_counter() - t0
        done = step + 1
        bar.update(1)
        is_last = done == cfg.steps
        if done % cfg.log_every == 0 or done % cfg.eval_every == 0 or is_last:
            row = {"step": done, "loss": window["loss_sum"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                   "tokens": done * gb * cfg.data.seq_len, "epoch": stream.epoch,
                   "step_seconds": window["step_seconds"] / window["steps"]}
            window = {"loss_sum": 0.0, "steps": 0, "step_seconds": 0.0}
            if done % cfg.eval_every == 0 or is_last:
                last_val = row["val_loss"] = evaluate(model, vals, accelerator)
            row["seconds"] = time.perf_counter() - t_run
            metrics.append(row)
            if main:
                with open(out / ck.METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
        if done % cfg.save_every == 0 or is_last:
            _save(out / ck.CHECKPOINT_DIR, model, opt, sched, accelerator, aliases, hf_config, metrics, [corpus_dir], {
                "step": done, "stream": stream.state().to_dict(), "config": cfg.to_dict(), "global_batch": gb,
                "processes": world, "seconds": time.perf_counter() - t_run, "metrics_window": window,
                "last_val_loss": last_val})
    bar.close()

    summary = _summary(cfg, metrics, world, gb, accelerator.mixed_precision, out)
    summary["distributed"] = str(accelerator.distributed_type.value)  # NO, MULTI_CPU, MULTI_GPU, FSDP, ...
    if main:
        # The final model from the checkpoint just written (unsharded whatever the launch was).
        summary["parameters"] = _export_model(ck.load_trained_model(out), corpus.tokenizer(), out / ck.MODEL_DIR, corpus_dir)
        write_json_output(out / ck.RUN_FILE, {"status": "done", "config": cfg.to_dict(), **summary},
                          kind=ck.RUN_KIND, overwrite=True, inputs=[corpus_dir], what="run.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _step(model, opt, sched, stream, accelerator, cfg: TrainConfig, gb: int) -> tuple[float, float | None]:
    """One optimiser step on this process's slices of the next global batch; returns the step's
    mean training loss over all processes and the gradient norm before clipping (None: no clipping)."""
    import torch

    accum = cfg.data.grad_accum
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros((), device=accelerator.device)
    for m in range(accum):
        x = stream.step_batch(gb, m, cfg.data.batch_size, rank, world).to(accelerator.device)
        # gradients are all-reduced once, on the last micro-batch
        with accelerator.no_sync(model) if m < accum - 1 else contextlib.nullcontext():
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss / accum)
        total += loss.detach().float()
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    stream.advance(gb)
    return float(accelerator.reduce(total / accum, "mean")), None if norm is None else float(norm)


def _save(folder: Path, model, opt, sched, accelerator, aliases: set[str], hf_config, metrics: list[dict[str, Any]],
          inputs: list[Path], state: dict[str, Any]) -> None:
    """Write the checkpoint: every process takes part in the gathers, the main process writes."""
    from accelerate.utils import gather_object

    from romscale.train import checkpoint as ck

    rngs = gather_object([ck.rng_state()])  # every process's generators, in rank order
    model_sd, optim_sd = ck.full_states(model, opt.optimizer)  # collective: gathered on the main process
    if accelerator.is_main_process:
        ck.save_checkpoint(folder, model_state=model_sd, aliases=aliases, optimizer_state=optim_sd, hf_config=hf_config,
                           scheduler=sched, rng=rngs, metrics=metrics, inputs=inputs, state=state)
    accelerator.wait_for_everyone()


def _summary(cfg: TrainConfig, metrics: list[dict[str, Any]], world: int, gb: int, precision: str, out: Path) -> dict[str, Any]:
    vals = [r for r in metrics if "val_loss" in r]
    last = metrics[-1] if metrics else {}
    times = [r["step_seconds"] for r in metrics]
    return {
        "run": str(out), "steps": cfg.steps, "processes": world, "global_batch": gb, "precision": precision,
        "tokens": cfg.steps * gb * cfg.data.seq_len, "final_loss": last.get("loss"),
        "final_val_loss": vals[-1]["val_loss"] if vals else None, "val_curve": [[r["step"], r["val_loss"]] for r in vals],
        "seconds": last.get("seconds"), "mean_step_seconds": sum(times) / len(times) if times else None,
        "memory": cfg.model.memory,
    }


def _export_model(model, tokenizer, folder: Path, corpus_dir: Path) -> int:
    """The final model as a memory checkpoint (MeKi, PLE, Engram, fat; fold / bundle read it) or a
    transformers folder; returns its parameter count."""
    from romscale.memories.base import attached_memories
    from romscale.utils.outputs import output_dir

    if attached_memories(model):
        from romscale.meki.io import save_memories

        save_memories(model, folder, tokenizer=tokenizer, overwrite=True, inputs=[corpus_dir])
    else:
        with output_dir(folder, kind="lm-model", inputs=[corpus_dir], overwrite=True, what="model") as o:
            model.save_pretrained(o.path)
            tokenizer.save_pretrained(o.path)
    return sum(p.numel() for p in model.parameters())


_FREE_KEYS = ("progress", "out")  # may change between a run and its resume


def _check_same_config(cfg: TrainConfig, saved: dict[str, Any], where: Path) -> None:
    from romscale.train.checkpoint import CheckpointError

    from romscale.train.config import config_from_dict
    from romscale.utils.config import ConfigError

    now = cfg.to_dict()
    try:  # fields added since the checkpoint was written take their defaults
        saved = config_from_dict(saved, str(where)).to_dict()
    except ConfigError:
        pass  # compared as it is: every differing key is named below
    diff = [k for k in sorted(set(now) | set(saved)) if k not in _FREE_KEYS and now.get(k) != saved.get(k)]
    if diff:
        detail = []
        for k in diff:
            a, b = saved.get(k), now.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                detail += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            else:
                detail.append(k)
        raise CheckpointError(f"{where}: the checkpoint was trained with a different config ({', '.join(detail)} differ); "
                              "resume with the same config, or start again with --overwrite")
