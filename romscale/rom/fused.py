"""A decode-time fusion of the FFN and the (external-table) MeKi branch placed parallel to it.

At batch 1 every small eager op costs a fixed few microseconds, which on 30 layers is a visible
share of a token's time even though MeKi adds under 2% of the multiply-adds. So for the deployed
model we:
- add the MeKi output into the down projection's matmul (addmm/addmv) instead of a separate add;
- compute the post RMSNorm's scale from a d_mem x d_mem Gram matrix (a scalar at batch 1);
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
        w_out = branch.out.weight.detach()
        scale = (branch.post_norm.weight * self.d_model**0.5).detach()
        # RMSNorm(W_out v) * w = (diag(w sqrt(d)) W_out) v / sqrt(v^T (W_out^T W_out) v + d * eps):
        # the norm comes from a d_mem x d_mem Gram matrix, and the result is added inside the down
        # projection's BLAS call; this saves several eager ops per layer at batch 1.
        self.w_out_scaled = nn.Parameter(scale[:, None] * w_out, requires_grad=False)
        self.gram = nn.Parameter(w_out.t() @ w_out, requires_grad=False)
        self.d_eps = self.d_model * eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x, self.w_gate_ffn)) * F.linear(x, self.w_up)
        v = fuse(self.state.layer_rows(self.slot), F.linear(x, self.w_gate_mem), self.fusion)
        if x.shape[:-1].numel() == 1:  # one token (decoding at batch 1): the norm is a scalar
            v = v.view(-1)
            inv = (float(torch.dot(torch.mv(self.gram, v), v)) + self.d_eps) ** -0.5
            return torch.addmv(F.linear(h, self.w_down).view(-1), self.w_out_scaled, v, alpha=inv).view_as(x)
        inv = torch.rsqrt(((v @ self.gram) * v).sum(-1, keepdim=True) + self.d_eps)
        y = F.linear(v, self.w_out_scaled) * inv
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
