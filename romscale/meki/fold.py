"""Fold: turn the training form into the deployed form (one precomputed table per layer)."""

from __future__ import annotations

import torch
from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.attach import MEKI_CONFIG_KEY, meki_branches, meki_state


@torch.no_grad()
def fold(model: nn.Module, chunk_rows: int = 8192) -> nn.Module:
    """Precompute M~_l = alpha_l * RMSNorm_mix(M_l + beta_l * G_l(E)) for every vocabulary row.

    In place; returns the model. G, alpha, beta and the mix norm are gone afterwards. Folding an
    already folded model is a no-op; a model without MeKi is an error.
    """
    state = meki_state(model)
    if state is None:
        raise RomscaleError(
            f"cannot fold {type(model).__name__}: it has no MeKi attached (use attach_meki or load a MeKi checkpoint)"
        )
    if state.folded:
        return model
    embedding_weight = model.get_input_embeddings().weight
    for _, branch in meki_branches(model):
        branch.fold_(embedding_weight, chunk_rows=chunk_rows)
    state.folded = True
    getattr(model.config, MEKI_CONFIG_KEY)["folded"] = True
    return model
