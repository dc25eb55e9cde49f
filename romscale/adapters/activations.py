"""A few examples per task -> each adapted module's input Gram, for HydraOpt's data-aware term.

The Gram X^T X (d_in x d_in, summed over tokens) is stored as a factor F (k x d_in) with
F^T F = X^T X restricted to its top-k eigen-directions, so the fit never needs the activations.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from romscale.errors import RomscaleError


def collect_input_factors(
    model: torch.nn.Module,
    examples: Mapping[str, Sequence[Sequence[int]]],
    modules: Sequence[str],
    *,
    max_rank: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run `model` (the base model the adapters were trained on; a PeftModel's base is used) on each
    task's examples (lists of token ids) and return task -> module -> F with F^T F ~ X^T X."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    targets = {}
    for name in modules:
        try:
            targets[name] = model.get_submodule(name)
        except AttributeError:
            raise RomscaleError(f"the model has no module {name!r}; is it the adapters' base model?") from None
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return fn

    device = next(model.parameters()).device  # the examples go where the model is (CPU or an accelerator)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    out: dict[str, dict[str, torch.Tensor]] = {}
    was_training = model.training
    try:
        model.eval()
        for task, exs in tqdm(list(examples.items()), desc="collect inputs", disable=not progress):
            grams.clear()
            if not exs:
                raise RomscaleError(f"task {task!r} has no examples")
            with torch.no_grad():
                for ids in exs:
                    model(input_ids=torch.as_tensor(list(ids), dtype=torch.long, device=device).unsqueeze(0))
            out[task] = {n: _factor(g, max_rank) for n, g in grams.items()}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out


def _factor(gram: torch.Tensor, max_rank: int) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(gram)
    vals, vecs = vals.flip(0)[:max_rank], vecs.flip(1)[:, :max_rank]
    keep = vals > vals[0].clamp_min(0) * 1e-12
    return (vecs[:, keep] * vals[keep].sqrt()).T.float().cpu().contiguous()  # beside the adapters' factors
