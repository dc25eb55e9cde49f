"""A small causal-LM trainer on accelerate: the same code runs on one CPU, one GPU, or several GPUs
launched with `accelerate launch` / `torchrun`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


@dataclass
class TrainConfig:
    """Defaults follow the MeKi paper's recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0, cosine to half
    the peak), scaled down in steps."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    mixed_precision: str = "no"  # "bf16" on GPUs
    progress: bool = True


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)

    @property
    def final_val_loss(self) -> float:
        return self.val[-1][1] if self.val else math.nan


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices and tables; not norms, scalars (MeKi's alpha/beta) or biases (nanoGPT's rule).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16, max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over `blocks`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = blocks[start : start + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train_lm(model: nn.Module, train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TrainConfig, desc: str = "train") -> TrainResult:
    """Train `model` in place for `cfg.steps` steps on random batches of `train_blocks`.

    Under `accelerate launch` / `torchrun` each process trains its shard and gradients are
    averaged (DDP); the caller's `model` object holds the trained weights in every process."""
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    loader = DataLoader(
        TensorDataset(train_blocks),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_blocks) >= cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    # Cosine from lr to min_lr_ratio * lr: transformers' schedule decays to 0, so stretch its
    # cycle so that step `steps` lands on the floor (cos(pi * c) = 2 * ratio - 1).
    cycles = math.acos(2 * cfg.min_lr_ratio - 1) / (2 * math.pi)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps, num_cycles=cycles)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    model.train()
    result = TrainResult()
    step = 0
    bar = tqdm(total=cfg.steps, desc=desc, disable=not (cfg.progress and accelerator.is_main_process))
    while step < cfg.steps:
        for (batch,) in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                v = evaluate_loss(model, val_blocks, cfg.batch_size, cfg.eval_batches)
                result.val.append((step, v))
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{v:.3f}")
            if step >= cfg.steps:
                break
    bar.close()
    return result
