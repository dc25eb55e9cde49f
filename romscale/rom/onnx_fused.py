"""The ONNX program's FFN + MeKi layers in the fused deploy layout (romscale.rom.fused's algebra).

Traced in its hook form, a layer's MeKi branch is a side path of small ops next to the FFN (its own
gate MatMul on the FFN's input, a Gather of its rows, ...), and at batch 1 the runtime pays a fixed
cost per op. For the export each parallel_ffn layer's MLP is swapped for `OnnxFusedMLP`:

    gate, up, g = split(x @ [W_gate_ffn; W_up; W_gate_mem]^T)      one MatMul reads x for all three
    out = (act(gate) * up) @ W_down^T + RMSNorm_post(W_out fuse(e, g))

with e this layer's slice of the `rows` input (one Split of the input serves every layer). That is
FFN(x) + MeKi(x), exactly what the hook form computes. FusedMekiMLP itself is not traced: its
Python branches on the shape and its C kernel serve eager decode, and a trace would bake the one
and cannot follow the other.

The other placements stay in the hook form, because there is no FFN input matmul to share:
parallel_attn reads the attention's input (its projections live inside the HF attention module),
after_attn's output is part of the FFN's input, and after_ffn reads the layer's output. So does a
layer whose MLP is not the gated, bias-free kind the layout is made for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from romscale.meki.attach import meki_branches, meki_state
from romscale.meki.layer import MekiBranch, fuse
from romscale.memories.base import get_path
from romscale.rom.fused import _is_gated_mlp

__all__ = ["OnnxFusedMLP", "SlotRows", "fused_mlps"]


class SlotRows:
    """The current step's rows, one [B, T, d_mem] tensor per MeKi slot: set by the traced step from
    the flat `rows` input [B, T, slots x d_mem] (one Split), read by the fused MLPs."""

    def __init__(self, d_mem: int) -> None:
        self.d_mem = d_mem
        self.parts: tuple[torch.Tensor, ...] = ()

    def set(self, rows: torch.Tensor) -> None:
        self.parts = rows.split(self.d_mem, dim=-1)

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self.parts[slot]


class OnnxFusedMLP(nn.Module):
    """FFN(x) + MeKi(x) of one layer as plain tensor ops, for the trace only (export-time copy of
    the gate weights; the down, out and post-norm modules are the originals)."""

    def __init__(self, mlp: nn.Module, branch: MekiBranch, rows: SlotRows) -> None:
        super().__init__()
        gate, up, mem = mlp.gate_proj.weight, mlp.up_proj.weight, branch.gate.weight
        self.w_in = nn.Parameter(torch.cat([gate, up, mem]).detach(), requires_grad=False)
        self.sizes = [gate.shape[0], up.shape[0], mem.shape[0]]
        self.act_fn, self.down = mlp.act_fn, mlp.down_proj
        self.out, self.post_norm = branch.out, branch.post_norm
        self.fusion, self.slot, self.rows = branch.cfg.fusion, branch.slot, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, g = nn.functional.linear(x, self.w_in).split(self.sizes, dim=-1)
        e = self.rows[self.slot].to(g.dtype)
        y = self.post_norm(self.out(fuse(e, g, self.fusion)))
        return self.down(self.act_fn(gate) * up) + y  # MatMul + Add


def _fusable(branch: MekiBranch, mlp: nn.Module) -> bool:
    return branch.cfg.position == "parallel_ffn" and branch.in_norm is None and _is_gated_mlp(mlp)


@contextmanager
def fused_mlps(model: nn.Module, rows: SlotRows | None, enabled: bool = True) -> Iterator[int]:
    """Inside the block every fusable MeKi layer of `model` runs OnnxFusedMLP (yields how many: 0
    when not `enabled` or without MeKi); after it, even after an error, the model has its own
    modules back. The layer's MeKi hook sits on its original MLP, which is out of the layer
    meanwhile, so the branch is not applied twice. The other layers keep the hook form."""
    state = meki_state(model)
    swapped: list[tuple[nn.Module, nn.Module]] = []
    try:
        for idx, branch in meki_branches(model) if enabled else []:
            layer = get_path(model, state.family.layers)[idx]
            mlp = getattr(layer, state.family.mlp)
            if _fusable(branch, mlp):
                setattr(layer, state.family.mlp, OnnxFusedMLP(mlp, branch, rows))
                swapped.append((layer, mlp))
        yield len(swapped)
    finally:
        for layer, mlp in swapped:
            setattr(layer, state.family.mlp, mlp)
