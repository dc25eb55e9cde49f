"""Correctness of the native runtime on the real model: fp32 exports against PyTorch (logits max-abs
on a prompt, 64 greedy tokens identical), and int8 weights against fp32 (greedy next-token agreement,
teacher-forced, over held-out corpus positions), for the dense model and for MeKi.

    python benchmarks/native_accuracy.py --work ~/.cache/romscale/bench-native --corpus runs/corpus-smollm2 \
        --positions 1024 --json results/native_accuracy_cpu.json

--work is the folder `romscale bundle bench decode --runtime onnxruntime` filled (run it with
--weights fp32 and with --weights int8 first): dense-fp32, dense-int8, meki-d72-fp32, meki-d72-int8
and the bundle meki-d72-fp16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from romscale.data.corpus import open_corpus
from romscale.models import load_causal_lm, packaged_model
from romscale.rom.ort_runtime import OrtDecoder
from romscale.rom.runtime import load_bundle
from romscale.utils.machine import machine_line
from romscale.utils.outputs import write_json_output


def against_torch(dec: OrtDecoder, model, prompt: np.ndarray, n: int) -> dict:
    with torch.no_grad():
        ref = model(torch.from_numpy(prompt)).logits[:, -1].numpy()
    logits, _ = dec._run(prompt, np.ones_like(prompt), dec._empty_cache(1))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref_tokens = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                    max_new_tokens=n, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].numpy()
    got = dec.generate(prompt, max_new_tokens=n).tokens[0]
    return {"logits_max_abs": float(np.abs(logits - ref).max()), "logits_max": float(np.abs(ref).max()),
            "greedy_tokens": n, "greedy_identical": bool((got == ref_tokens).all()),
            "first_difference": None if (got == ref_tokens).all() else int(np.argmax(got != ref_tokens))}


def teacher_forced_argmax(dec: OrtDecoder, seqs: np.ndarray) -> np.ndarray:
    """Argmax after every prefix of each sequence, one decode step per position."""
    out = []
    for seq in seqs:
        past, mask, preds = dec._empty_cache(1), np.ones((1, 0), np.int64), []
        for tok in seq:
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            logits, past = dec._run(np.array([[tok]], np.int64), mask, past)
            preds.append(int(logits.argmax()))
        out.append(preds)
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True, help="a SmolLM2-tokenised corpus (its validation split)")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--d-mem", type=int, default=72)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, dm = args.work, args.d_mem
    val = np.concatenate([np.asarray(shard) for shard in open_corpus(args.corpus).val])[: args.positions].astype(np.int64)
    seqs = val[: (len(val) // args.seq_len) * args.seq_len].reshape(-1, args.seq_len)
    prompt = val[None, :16].copy()
    out: dict = {"machine": machine_line(), "positions": int(seqs.size), "seq_len": args.seq_len, "corpus": str(args.corpus)}

    model, _ = load_causal_lm(packaged_model("smollm2-135m-instruct"), dtype=torch.float32)
    model.eval()
    dense32, dense8 = OrtDecoder(w / "dense-fp32", threads=args.threads), OrtDecoder(w / "dense-int8", threads=args.threads)
    out["dense_fp32_vs_torch"] = against_torch(dense32, model, prompt, 64)
    a, b = teacher_forced_argmax(dense32, seqs), teacher_forced_argmax(dense8, seqs)
    out["dense_int8_vs_fp32_greedy_agreement"] = float((a == b).mean())
    print(out["dense_fp32_vs_torch"], "dense int8 agreement", out["dense_int8_vs_fp32_greedy_agreement"], flush=True)
    del model

    bundle = load_bundle(w / f"meki-d{dm}-fp16")
    meki32, meki8 = OrtDecoder(w / f"meki-d{dm}-fp32", threads=args.threads), OrtDecoder(w / f"meki-d{dm}-int8", threads=args.threads)
    out["meki_fp32_vs_torch_bundle"] = against_torch(meki32, bundle.model, prompt, 64)
    a, b = teacher_forced_argmax(meki32, seqs), teacher_forced_argmax(meki8, seqs)
    out["meki_int8_vs_fp32_greedy_agreement"] = float((a == b).mean())
    print(out["meki_fp32_vs_torch_bundle"], "MeKi int8 agreement", out["meki_int8_vs_fp32_greedy_agreement"], flush=True)
    bundle.close()
    out["command"] = ("python benchmarks/native_accuracy.py --work " + str(args.work) + f" --corpus {args.corpus} "
                      f"--positions {args.positions} --json {args.json}")
    write_json_output(args.json, out, kind="native-accuracy", overwrite=True)


if __name__ == "__main__":
    main()
