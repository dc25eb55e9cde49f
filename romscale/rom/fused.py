"""A decode-time fusion of the FFN and the (external-table) MeKi branch placed parallel to it.

At batch 1 every small eager op costs a fixed few microseconds, which on 30 layers is a visible
share of a token's time even though MeKi adds under 2% of the multiply-adds. So for the deployed
model we:
- add the MeKi output into the down projection's matmul (addmm) instead of a separate add;
- compute the post RMSNorm with one vector_norm and a hypot;
- skip the hook machinery and the dtype round trips of the generic branch.
Measured here and rejected: concatenating W_gate (or the FFN's gate and up) into one matmul was
slower on this CPU than separate matmuls. The result equals FFN(h) + MeKi(h) up to float rounding
(tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from romscale.meki.attach import MekiState, meki_branches, meki_state
from romscale.meki.layer import MekiBranch, fuse


def _is_gated_mlp(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and not any(
        getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
    )


class FusedMekiMLP(nn.Module):
    """down(act(gate(x)) * up(x)) + MeKi(x), with the MeKi rows taken from the ROM row source."""

    def __init__(self, mlp: nn.Module, branch: MekiBranch, state: MekiState) -> None:
        super().__init__()
        self.w_gate_ffn, self.w_up, self.w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self.act = mlp.act_fn
        self.w_gate_mem, self.w_out = branch.gate.weight, branch.out.weight
        self.slot, self.fusion, self.state = branch.slot, branch.cfg.fusion, state
        self.d_model = branch.out.out_features
        eps = branch.post_norm.eps if branch.post_norm.eps is not None else torch.finfo(torch.float32).eps
        # RMSNorm(z) * w = z * (w * sqrt(d)) / sqrt(|z|^2 + d * eps): one vector_norm and a hypot
        # instead of pow/mean/add/rsqrt, which cost ~2x more at batch 1 on CPU.
        self.post_w_scaled = nn.Parameter((branch.post_norm.weight * self.d_model**0.5).detach(), requires_grad=False)
        self.register_buffer("eps_term", torch.tensor((self.d_model * eps) ** 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x, self.w_gate_ffn)) * F.linear(x, self.w_up)
        rows = self.state.layer_rows(self.slot)
        z = F.linear(fuse(rows, F.linear(x, self.w_gate_mem), self.fusion), self.w_out)
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        y = torch.mul(z, self.post_w_scaled).div_(torch.hypot(norm, self.eps_term))
        # down(h) + y in one BLAS call: y is the addmm's bias input.
        return torch.addmm(y.reshape(-1, self.d_model), h.reshape(-1, h.shape[-1]), self.w_down.t()).view_as(y)


def fuse_meki_ffn(model: nn.Module) -> int:
    """Replace FFN + parallel MeKi by FusedMekiMLP where possible (external tables, parallel_ffn
    position, gated MLP). Removes the now redundant hooks. Returns the number of layers fused."""
    state = meki_state(model)
    if state is None or not state.external or state.cfg.position != "parallel_ffn":
        return 0
    layers = model.get_decoder().layers
    fused = 0
    for idx, branch in meki_branches(model):
        mlp = getattr(layers[idx], state.family.mlp)
        if not _is_gated_mlp(mlp):
            continue
        # The MeKi hook sits on this MLP module: dropping the module drops the hook with it.
        setattr(layers[idx], state.family.mlp, FusedMekiMLP(mlp, branch, state))
        fused += 1
    return fused
