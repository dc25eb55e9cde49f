"""Logit lens: how close each layer's early prediction is to the model's final one (MeKi paper's
analysis, /shared/methods/meki.md: "KL(layer-l early prediction || final prediction) is lower at
every layer with MeKi").

For the residual stream h_l after decoder block l, the early prediction is the model's own final
norm and output head applied to it: q_l = softmax(head(norm(h_l))). The final prediction p is the
model's logits. Reported per layer, as means over validation positions in nats: `kl` =
KL(p || q_l) = sum_v p(v) (log p(v) - log q_l(v)) (final to lens: the task's definition, and what
the plot shows), and `kl_reverse` = KL(q_l || p) (meki.md writes the paper's measure as
KL(early || final); the direction is not settled there, so both are given); and the fraction of
positions where argmax q_l = argmax p. For the last block, norm(h_L) is what the head
reads, so its KL is 0 up to rounding (a check that the hooks see the right tensors).

Block outputs are taken with forward hooks on the decoder layers, registered after any memory
hooks (MeKi's), so they see each layer's full output.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from romscale.analysis.common import batches, check_model, figure, model_label, val_blocks
from romscale.errors import UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

__all__ = ["lens_parts", "logit_lens", "logit_lens_report", "plot_logit_lens"]


def lens_parts(model: nn.Module) -> tuple[Sequence[nn.Module], nn.Module, nn.Module]:
    """(decoder layers, final norm, output head) of an HF decoder-only model."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the logit lens needs decoder.layers, decoder.norm and an output head "
            "(the Llama / Qwen / Mistral layout)"
        )
    return list(layers), norm, head


def logit_lens(model: nn.Module, blocks: np.ndarray, *, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Per layer: mean KL(final || lens) and KL(lens || final) in nats and top-1 agreement, over every
    position of `blocks` (inputs are block[:, :-1])."""
    import torch

    layers, norm, head = lens_parts(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_m, _args, out):
            captured[i] = out[0] if isinstance(out, tuple) else out
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    kl = [0.0] * len(layers)
    rev = [0.0] * len(layers)
    agree = [0] * len(layers)
    n = 0
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for x in batches(blocks, batch_size, progress, "logit lens"):
                inputs = x[:, :-1].to(device)
                captured.clear()
                logp = torch.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)
                p, top = logp.exp(), logp.argmax(-1)
                for i in range(len(layers)):
                    lq = torch.log_softmax(head(norm(captured[i])).float(), dim=-1)
                    kl[i] += (p * (logp - lq)).sum(-1).sum().item()
                    rev[i] += (lq.exp() * (lq - logp)).sum(-1).sum().item()
                    agree[i] += (lq.argmax(-1) == top).sum().item()
                n += inputs.numel()
    finally:
        for h in handles:
            h.remove()
    return {"layers": len(layers), "positions": n, "kl": [v / n for v in kl], "kl_reverse": [v / n for v in rev],
            "top1_agreement": [a / n for a in agree]}


def logit_lens_report(models: Sequence[Path], corpus_dir: Path, *, tokens: int = 32768, seq_len: int = 256,
                      batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Load each model, run the logit lens on the corpus's first `tokens` validation targets."""
    from romscale.data.corpus import open_corpus
    from romscale.eval.mc import load_scoring_model

    corpus = open_corpus(corpus_dir)
    blocks = val_blocks(corpus, tokens, seq_len)
    out = []
    for path in models:
        sm = load_scoring_model(path)
        try:
            check_model(sm.model, corpus, seq_len, str(path))
            res = logit_lens(sm.model, blocks, batch_size=batch_size, progress=progress)
        finally:
            sm.close()
        out.append({"model": str(path), "label": model_label(Path(path), list(models)), "model_kind": sm.kind, **res})
    return {"corpus": str(corpus_dir), "tokens": int(blocks.shape[0] * seq_len), "seq_len": seq_len,
            "measure": "kl: mean over validation positions of KL(final || logit lens of block l) in nats; "
                       "kl_reverse: KL(lens || final); lens = head(norm(h_l))",
            "models": out}


def plot_logit_lens(report: dict[str, Any]):
    """KL per layer, one line per model (layers as a fraction of depth when depths differ)."""
    fig, ax = figure()
    depths = {m["layers"] for m in report["models"]}
    for m in report["models"]:
        xs = [(i + 1) / m["layers"] if len(depths) > 1 else i for i in range(m["layers"])]
        ax.plot(xs, m["kl"], marker="o", label=m["label"])
    if len(depths) == 1:
        ax.set_xticks(range(depths.pop()))
    ax.set_xlabel("block (fraction of depth)" if len(depths) > 1 else "after decoder block")
    ax.set_ylabel("KL(final || logit lens), nats")
    ax.set_title(f"logit lens on {report['tokens']:,} validation tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
