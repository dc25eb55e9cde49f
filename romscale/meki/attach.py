"""Attach MeKi to Hugging Face decoder models without forking their modeling code.

Each MeKi branch is registered as a submodule `meki` of its decoder layer (so it saves, loads, moves
and trains with the model) and wired in with forward hooks at the place its `position` names. The
token ids reach the branches through the id recorder every memory shares
(romscale.memories.base.IdRecorder, one pre-hook on the decoder stack): full forwards, each
`generate()` step (a decode step records only the new tokens, which is what the cached positions
need) and left-padded batches alike.

Adding a family: if its decoder layers follow the Llama layout (romscale.memories.base.Family,
attention returning a tuple whose first item is the output, the MLP called with the normalised
hidden state), add its `model_type` to FAMILIES there with the attribute names. Anything else needs
its own entry with different names, or a new hook placement in `_install_hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from romscale.errors import RomscaleError, UnsupportedModelError
from romscale.meki.config import MekiConfig
from romscale.meki.layer import MekiBranch
from romscale.memories.base import FAMILIES, Family, IdRecorder, get_path, join_recorder, leave_recorder
from romscale.memories.base import family_of as _family_of

__all__ = ["FAMILIES", "Family", "MekiState", "attach_meki", "detach_meki", "family_of", "meki_branches", "meki_state"]


MEKI_CONFIG_KEY = "meki"  # the section of config.json that carries the MeKi config


@dataclass
class MekiState:
    """Per-model runtime state: the config, the current token ids, and the hook handles."""

    cfg: MekiConfig
    folded: bool
    family: Family
    external: bool = False
    ids: torch.Tensor | None = None
    # External (ROM) tables: row_source(ids) -> ids.shape + (meki layers, d_mem), called once per
    # forward as soon as the ids are known; each branch then takes its own slice.
    row_source: Callable[[torch.Tensor], Any] | None = None
    rows: Any = None
    handles: list[RemovableHandle] = field(default_factory=list)

    def current_rows(self) -> torch.Tensor | None:
        """All MeKi layers' rows for the current call, ids.shape + (layers, d_mem)."""
        if self.rows is not None and not isinstance(self.rows, torch.Tensor):  # a prefetcher's Future
            self.rows = self.rows.result()
        return self.rows

    def layer_rows(self, slot: int) -> torch.Tensor | None:
        rows = self.current_rows()
        return None if rows is None else rows[..., slot, :]


_get = get_path


def family_of(model: nn.Module) -> Family:
    return _family_of(model, "MeKi")


def meki_state(model: nn.Module) -> MekiState | None:
    return getattr(model, "_meki_state", None)


def meki_branches(model: nn.Module) -> list[tuple[int, MekiBranch]]:
    """(layer index, branch) for every layer that carries MeKi."""
    state = meki_state(model)
    if state is None:
        return []
    layers = _get(model, state.family.layers)
    return [(i, layer.meki) for i, layer in enumerate(layers) if isinstance(getattr(layer, "meki", None), MekiBranch)]


def _first_input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _install_hooks(model: nn.Module, state: MekiState, embedding: nn.Embedding) -> None:
    fam = state.family

    def on_ids(rec: IdRecorder) -> None:
        # The shared recorder (romscale.memories.base) has checked the ids; MeKi reads rows by
        # the current call's token ids only, so it keeps no history.
        state.ids = rec.ids
        state.rows = state.row_source(rec.ids) if state.row_source is not None else None

    join_recorder(model, "meki", keep=0, listener=on_ids)

    def branch_out(branch: MekiBranch, h: torch.Tensor) -> torch.Tensor:
        return branch(h, state.ids, embedding.weight, rows=state.layer_rows(branch.slot))

    for slot, (_, layer) in enumerate(_layer_items(model, state)):
        branch: MekiBranch = layer.meki
        branch.slot = slot
        attn, mlp = getattr(layer, fam.attn), getattr(layer, fam.mlp)
        pos = state.cfg.position
        if pos == "parallel_ffn":
            # FFN(H) + MeKi(H) + A, with H = the pre-FFN normalised hidden state the MLP receives.
            def hook(_m, args, kwargs, out, b=branch):
                return out + branch_out(b, _first_input(args, kwargs, "x"))

            state.handles.append(mlp.register_forward_hook(hook, with_kwargs=True))
        elif pos == "parallel_attn":
            # Attn(H) + MeKi(H) + x, with H = the pre-attention normalised hidden state.
            def hook(_m, args, kwargs, out, b=branch):
                h = _first_input(args, kwargs, "hidden_states")
                return (out[0] + branch_out(b, h), *out[1:])

            state.handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        elif pos == "after_attn":
            # A' = A + MeKi(RMSNorm_in(A)) with A = x + Attn(...): the residual x is the layer input.
            def pre(_m, args, kwargs, b=branch):
                b._residual = _first_input(args, kwargs, "hidden_states")

            def hook(_m, args, kwargs, out, b=branch):
                a = b._residual + out[0]
                b._residual = None
                return (out[0] + branch_out(b, a), *out[1:])

            state.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            state.handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        elif pos == "after_ffn":
            # Y' = Y + MeKi(RMSNorm_in(Y)) on the layer output.
            def hook(_m, args, kwargs, out, b=branch):
                if isinstance(out, tuple):
                    return (out[0] + branch_out(b, out[0]), *out[1:])
                return out + branch_out(b, out)

            state.handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        else:  # MekiConfig validates this; kept for a clear failure if a new value slips in
            raise RomscaleError(f"unknown MeKi position {pos!r}")


def _layer_items(model: nn.Module, state: MekiState) -> list[tuple[int, nn.Module]]:
    layers = _get(model, state.family.layers)
    return [(i, layers[i]) for i in state.cfg.layer_indices(len(layers))]


def attach_meki(model: nn.Module, cfg: MekiConfig, folded: bool = False, external: bool = False) -> nn.Module:
    """Add a MeKi branch to every (selected) decoder layer of a HF *ForCausalLM model, in place.

    With `cfg.zero_init_output` (the default) the branches output exactly zero, so a pretrained
    model's logits are unchanged until training moves them. `folded=True` builds the deployed form
    (used when loading a folded checkpoint); `external=True` the deployed form whose tables stay on
    storage (romscale.rom.runtime connects them). Returns the model.
    """
    fam = family_of(model)
    if meki_state(model) is not None:
        raise RomscaleError("this model already has MeKi attached")
    layers = _get(model, fam.layers)  # family_of checked the layout
    embedding = model.get_input_embeddings()
    vocab_size, d_model = embedding.weight.shape
    folded = folded or external
    state = MekiState(cfg=cfg, folded=folded, family=fam, external=external)
    ref = embedding.weight
    for i in cfg.layer_indices(len(layers)):
        layer = layers[i]
        for name in (fam.attn, fam.mlp):
            if not hasattr(layer, name):
                raise UnsupportedModelError(f"decoder layer {i} of {type(model).__name__} has no .{name}")
        # Built directly on the model's device: on "meta" nothing is allocated (paper-size presets).
        with torch.device(ref.device):
            layer.meki = MekiBranch(cfg, d_model, vocab_size, folded=folded, external=external).to(dtype=ref.dtype)
    # Set after the branches exist: nn.Module stores plain objects in __dict__, outside state_dict.
    model._meki_state = state
    _install_hooks(model, state, embedding)
    model.config.meki = {**cfg.to_dict(), "folded": folded, "tables": "external" if external else "inline"}
    return model


def detach_meki(model: nn.Module) -> nn.Module:
    """Remove MeKi (hooks, branches, config section): the model is the plain base model again."""
    state = meki_state(model)
    if state is None:
        raise RomscaleError("this model has no MeKi attached")
    for h in state.handles:
        h.remove()
    leave_recorder(model, "meki")
    for _, layer in _layer_items(model, state):
        del layer.meki
    del model._meki_state
    if hasattr(model.config, MEKI_CONFIG_KEY):
        delattr(model.config, MEKI_CONFIG_KEY)
    return model
