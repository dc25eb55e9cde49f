"""Per-task LoRA training on a task bank: one loaded base model, one PEFT LoRA per task.

    cfg = LoraTrainConfig(rank=16, alpha=32, steps=200)
    summary = train_task_adapters(TaskBank.open("bank/"), "smollm2-135m-instruct", Path("lib/"), cfg)
    adapters = load_library("lib/")            # an AdapterBank, names = task names

The papers' setting: every task's LoRA starts from the same seed, so all tasks share the same
lora_A initialisation (the premise of HydraOpt's shared A); B starts at zero (PEFT's default). The
loss is on the target tokens only (prompt labels IGNORE), computed with the LM head on those
positions only. AdamW with linear warm-up then cosine decay, gradient clipping, optional bf16
autocast. Resumable per task: a task whose adapter folder in LIB is complete (manifest-verified) is
skipped; a writer killed mid-write leaves only temporary debris, which the next write removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from romscale.adapters.library import (
    LIBRARY_KIND,
    ADAPTER_KIND,
    check_library,
    check_library_target,
    create_library,
    finished_adapter,
    write_runs,
)
from romscale.errors import AdapterError, RomscaleError
from romscale.eval.generate import autocast_context, pad_right, target_token_losses
from romscale.eval.prompting import encode_example
from romscale.eval.slot import QKVO
from romscale.utils.outputs import output_dir

# cuBLAS reads this when its first handle is made: set at import, before any CUDA work of the process
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Fields that make two runs incompatible: a library is resumed only with the same values.
_RESUME_KEYS = ("rank", "alpha", "target_modules", "dropout", "steps", "lr", "batch_size", "max_len", "warmup_ratio",
                "weight_decay", "grad_clip", "seed", "bf16")


@dataclass
class LoraTrainConfig:
    """How every task's LoRA is trained (the same for all tasks of a library)."""

    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = QKVO
    dropout: float = 0.0
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 8
    max_len: int = 256
    warmup_ratio: float = 0.1  # fraction of steps of linear warm-up, then cosine to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # bf16 autocast (CPU or GPU)
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        checks = [("rank", self.rank >= 1), ("alpha", self.alpha > 0), ("steps", self.steps >= 1), ("lr", self.lr > 0),
                  ("batch_size", self.batch_size >= 1), ("max_len", self.max_len >= 2),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1), ("dropout", 0 <= self.dropout < 1),
                  ("weight_decay", self.weight_decay >= 0), ("grad_clip", self.grad_clip >= 0),
                  ("target_modules", bool(self.target_modules))]
        for name, ok in checks:
            if not ok:
                raise RomscaleError(f"LoraTrainConfig.{name} = {getattr(self, name)!r} is out of range")

    def record(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d.pop("device")
        return d


@dataclass
class TaskRun:
    """What training one task produced (also stored in its adapter's manifest)."""

    task: str
    steps: int
    seconds: float
    final_loss: float
    first_loss: float
    n_train: int
    target_tokens: int
    device: str
    losses: list[float] = field(default_factory=list)


def _device(cfg: LoraTrainConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def base_label(base: str | Path) -> str:
    """What adapters record as base_model_name_or_path: a packaged model's name, else the path."""
    from romscale.models import PACKAGED_MODELS

    return str(base) if str(base) in PACKAGED_MODELS else str(Path(base).resolve())


def load_base(base: str | Path, option: str = "--base", device: torch.device | str = "cpu", progress: bool = True):
    """(model in float32 on `device`, tokenizer) from a packaged name, a HF folder or a GGUF file."""
    from transformers.utils import logging as hf_logging

    from romscale.models import load_base_model

    restore = not progress and hf_logging.is_progress_bar_enabled()
    if restore:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        model, tokenizer = load_base_model(base, dtype=torch.float32, option=option)
    finally:
        if restore:
            hf_logging.enable_progress_bar()
    if tokenizer is None:
        raise AdapterError(f"{option} {base}: has no tokenizer files; task training and evaluation need the tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches for `steps` steps: a fresh seeded permutation every epoch."""
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    for _ in range(steps):
        while len(perm) < batch_size:
            perm += torch.randperm(n, generator=g).tolist()
        yield perm[:batch_size]
        perm = perm[batch_size:]


@contextlib.contextmanager
def reproducible(device: torch.device):
    """On CUDA, deterministic kernels for a training run: the same seed then gives the same adapter
    bytes on the same GPU model and torch/CUDA build, so a later session's retrained library
    reproduces an earlier one and its scored points can be reused (`adapters benchmark --reuse`).
    Attention runs PyTorch's math kernel (flash and memory-efficient backward passes use atomics);
    ops with no deterministic kernel warn rather than fail. On the CPU kernels are deterministic
    already for a fixed thread count."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def train_one(model: torch.nn.Module, tokenizer: Any, task: Any, cfg: LoraTrainConfig, base: str,
              progress: bool = True) -> tuple[Any, TaskRun]:
    """Train one task's LoRA on `model` (wrapped with PEFT for the run). Returns (PeftModel, run);
    the caller saves it and then calls `.unload()` to get the plain base model back."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    examples = task.examples("train")
    if not examples:
        raise RomscaleError(f"task {task.name!r} has no training examples")
    encoded = [encode_example(tokenizer, task, ex, cfg.max_len) for ex in examples]
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)  # the same seed for every task: identical lora_A initialisation
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=cfg.dropout,
                      bias="none", task_type="CAUSAL_LM")
    try:
        peft = get_peft_model(model, lcfg)
    except ValueError as exc:
        raise AdapterError(f"--base {base}: cannot put LoRA on {list(cfg.target_modules)}: {exc}") from exc
    peft.peft_config["default"].base_model_name_or_path = base
    try:
        params = [p for p in peft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
        inner = peft.get_base_model()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        losses: list[float] = []
        tokens = 0
        peft.train()
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, desc=task.name, leave=False, disable=not progress)
        with reproducible(device):  # forward and backward
            for idx in _batches(len(encoded), cfg.batch_size, cfg.steps, cfg.seed):
                ids, mask, lab = pad_right([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad)
                with autocast_context(device, cfg.bf16):
                    ce, _ = target_token_losses(inner, ids.to(device), mask.to(device), lab.to(device))
                loss = ce.mean()
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += int(ce.numel())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        if not all(math.isfinite(x) for x in losses):
            raise RomscaleError(f"task {task.name!r}: the training loss became NaN/Inf (lower --lr?)")
    except BaseException:  # leave the caller the plain base model, not a half-trained LoRA
        peft.unload()
        raise
    peft.eval()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    run = TaskRun(task=task.name, steps=cfg.steps, seconds=round(seconds, 3), final_loss=sum(tail) / len(tail),
                  first_loss=losses[0], n_train=len(examples), target_tokens=tokens, device=str(device),
                  losses=[round(x, 5) for x in losses])
    return peft, run


def train_task_adapters(bank: Any, base: str | Path, out: Path, cfg: LoraTrainConfig, tasks: Sequence[str] | None = None,
                        progress: bool = True, overwrite: bool = False,
                        log: Callable[[str], None] | None = None, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Train one LoRA per task of `bank` (all of them, or `tasks`) into the library `out`.

    A new `out` is created (kind "adapter-library"); an existing library is resumed: finished tasks
    are skipped, if it was made with the same base and config (else an error says what differs).
    `overwrite` starts the library again. `shard=(i, n)`: train only every n-th task from the i-th
    (processes sharing one GPU; shard 0 creates the library, the others wait for it to exist).
    Returns {"trained": [...], "skipped": [...], "runs": {...}}."""
    out = Path(out)
    names = list(bank.names if tasks is None else tasks)
    if shard is not None and shard[0] > 0:
        if overwrite:
            raise RomscaleError("--overwrite is for shard 0 only (it would delete the other shards' work)")
        from romscale.utils.outputs import wait_for_output

        wait_for_output(out, LIBRARY_KIND, what=f"--out {out} (made by shard 0)")
    unknown = [t for t in names if t not in bank.names]
    if unknown:
        raise RomscaleError(f"--tasks: {unknown[:5]} not in the task bank {bank.path} (it has {bank.names[:8]}...)")
    if not names:
        raise RomscaleError("no tasks to train")
    label = base_label(base)
    record = cfg.record()
    inputs = [bank.path]
    if check_library_target(out, inputs=inputs, overwrite=overwrite):
        meta = check_library(out)
        old = meta["config"]
        diff = [k for k in _RESUME_KEYS if old.get(k) != record.get(k)]
        if meta.get("base") != label:
            diff.insert(0, "base")
        if diff:
            raise AdapterError(f"--out {out}: this library was trained with other settings ({', '.join(diff)}: "
                               f"{[meta.get('base') if k == 'base' else old.get(k) for k in diff]}); use the same options "
                               "to resume it, or --overwrite to start it again")
    else:
        create_library(out, label, record, inputs=inputs, overwrite=overwrite)
    say = log or (lambda s: None)
    todo, skipped = [], []
    for t in (names if shard is None else names[shard[0] :: shard[1]]):
        (skipped if finished_adapter(out, t) is not None else todo).append(t)
    if skipped:
        say(f"resuming {out}: {len(skipped)} finished task(s) skipped, {len(todo)} to train")
    trained: list[str] = []
    if todo:
        device = _device(cfg)
        model, tokenizer = load_base(base, device=device, progress=progress)
        for t in tqdm(todo, desc="tasks", disable=not progress):
            if finished_adapter(out, t) is not None:  # another run of this command finished it meanwhile
                skipped.append(t)
                continue
            peft, run = train_one(model, tokenizer, bank.task(t), cfg, label, progress)
            with output_dir(out / t, kind=ADAPTER_KIND, inputs=inputs, what=f"--out {out}: task {t}") as o:
                # save_embedding_layers=False: no embedding is trained, and "auto" would look the base up on the
                # Hugging Face Hub when base_model_name_or_path is a packaged name (no network at run time)
                peft.save_pretrained(str(o.path), save_embedding_layers=False)
                o.meta["run"] = {**dataclasses.asdict(run), "config": record, "seed": cfg.seed, "base": label}
            model = peft.unload()  # the plain base model again (LoRA layers removed, weights untouched)
            trained.append(t)
            if shard is None:  # shards would race on runs.json: the unsharded run after them writes it
                write_runs(out, names)
            say(f"{t}: {run.steps} steps in {run.seconds:.1f} s, final loss {run.final_loss:.4f}")
    if shard is not None:
        mine = trained + skipped
        return {"library": str(out), "base": label, "trained": trained, "skipped": skipped,
                "runs": {t: finished_adapter(out, t) for t in mine}}
    path = write_runs(out, names) if not trained else out / "runs.json"
    from romscale.utils.outputs import read_json

    runs = read_json(path, AdapterError)["runs"]
    return {"library": str(out), "base": label, "trained": trained, "skipped": skipped, "runs": runs}
