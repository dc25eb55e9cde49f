"""int8 vs fp16 ROM tables on a trained model: the tiny preset trained on real text (Shakespeare),
folded, exported twice, and compared on held-out text.

    python benchmarks/rom_int8_quality.py --out results/rom_int8_quality_cpu.json

Figures: next-token greedy (argmax) agreement at 1,024 held-out positions (teacher-forced, so one
early difference does not cascade), free-running greedy generation agreement, validation loss of
each bundle, and the table sizes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.presets import build_model, get_preset
from romscale.rom.runtime import export_bundle, load_bundle
from romscale.train.data import fetch_shakespeare, make_blocks, read_texts, shakespeare_tokenizer
from romscale.train.loop import TrainConfig, evaluate_loss, train_lm
from romscale.utils.outputs import write_json_output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/rom_int8_quality_cpu.json"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    texts = read_texts(fetch_shakespeare())
    tok = shakespeare_tokenizer(texts, 4096)
    blocks = make_blocks(texts, tok, block_size=128, seed=args.seed)
    preset = get_preset("tiny")
    model = build_model("tiny", MekiConfig(d_mem=preset.d_mem, zero_init_output=False), vocab_size=len(tok), seed=args.seed)
    res = train_lm(model, blocks.train, blocks.val, TrainConfig(steps=args.steps, batch_size=16, lr=3e-3, eval_every=100, seed=args.seed))
    fold(model.eval())
    n_blocks = -(-args.positions // (blocks.val.shape[1] - 1))
    val = blocks.val[:n_blocks]
    prompt = blocks.val[-1:, :16]

    out: dict = {"train_steps": args.steps, "train_val_curve": res.val}
    preds, gens = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp16", "int8"):
            b = load_bundle(export_bundle(model, Path(tmp) / dtype, dtype=dtype))
            with torch.no_grad():
                logits = b.model(input_ids=val).logits[:, :-1]
            preds[dtype] = logits.argmax(-1).reshape(-1)[: args.positions]
            gens[dtype] = b.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.gen_tokens,
                min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0,
            )[0, prompt.shape[1]:]
            out[dtype] = {
                "val_loss": evaluate_loss(b.model, blocks.val),
                "table_bytes": b.table.table_bytes,
                "file_bytes": b.table.manifest["file_bytes"],
                "read_bytes_per_token": b.table.row_bytes,
            }
            b.close()
    first_diff = (gens["fp16"] != gens["int8"]).nonzero()
    out["comparison"] = {
        "positions": int(preds["fp16"].numel()),
        "greedy_agreement": (preds["fp16"] == preds["int8"]).float().mean().item(),
        "generation_agreement": (gens["fp16"] == gens["int8"]).float().mean().item(),
        "generation_first_difference": int(first_diff[0]) if len(first_diff) else None,
        "val_loss_diff_nats": out["int8"]["val_loss"] - out["fp16"]["val_loss"],
        "table_size_ratio": out["int8"]["table_bytes"] / out["fp16"]["table_bytes"],
        "table_plus_scales_ratio": out["int8"]["read_bytes_per_token"] / out["fp16"]["read_bytes_per_token"],
    }
    out["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    c = out["comparison"]
    table = Table(title=f"int8 vs fp16 ROM table, tiny preset trained {args.steps} steps on Shakespeare")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("greedy agreement (teacher-forced)", f"{c['greedy_agreement']:.2%} of {c['positions']}")
    table.add_row("free-running greedy agreement", f"{c['generation_agreement']:.2%} of {args.gen_tokens}")
    table.add_row("val loss fp16 / int8", f"{out['fp16']['val_loss']:.4f} / {out['int8']['val_loss']:.4f}")
    table.add_row("val loss difference", f"{c['val_loss_diff_nats']:+.5f} nats")
    table.add_row("table bytes int8 / fp16", f"{c['table_size_ratio']:.3f}")
    table.add_row("per-token read incl. scales", f"{c['table_plus_scales_ratio']:.3f}")
    Console().print(table)
    write_json_output(args.out, out, overwrite=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
