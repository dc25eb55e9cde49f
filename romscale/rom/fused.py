"""A decode-time fusion of the FFN and the (external-table) MeKi branch placed parallel to it.

At batch 1 every small eager op costs a fixed few microseconds, which on 30 layers is a visible
share of a token's time even though MeKi adds under 2% of the multiply-adds. So for the deployed
model we:
- optionally compute W_gate h in the same matmul as the FFN's gate and up projections (they read
  the same h);
- add the MeKi output into the down projection's matmul (addmm) instead of a separate add;
- skip the hook machinery and the dtype round trips of the generic branch.
The result equals FFN(h) + MeKi(h) up to float rounding (tests check it). `fuse_gate_up` applies the
same gate/up concatenation to a dense model, so benchmarks can compare like with like.
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


class FusedGatedMLP(nn.Module):
    """act(gate(x)) * up(x) -> down, plus the parallel MeKi branch, with fewer eager ops.

    `concat_gate_up=True` computes gate, up (and MeKi's gate) in one matmul; False keeps the FFN's
    own two matmuls and adds MeKi's gate as a third, so the dense part is op-for-op the original.
    """

    def __init__(
        self,
        mlp: nn.Module,
        branch: MekiBranch | None = None,
        state: MekiState | None = None,
        concat_gate_up: bool = False,
    ) -> None:
        super().__init__()
        self.concat = concat_gate_up
        self.ffn = mlp.gate_proj.out_features
        if concat_gate_up:
            weights = [mlp.gate_proj.weight, mlp.up_proj.weight] + ([branch.gate.weight] if branch is not None else [])
            self.w_in = nn.Parameter(torch.cat(weights).detach(), requires_grad=False)
        else:
            self.w_gate_ffn, self.w_up = mlp.gate_proj.weight, mlp.up_proj.weight
            self.w_gate_mem = branch.gate.weight if branch is not None else None
        self.w_down = mlp.down_proj.weight
        self.act = mlp.act_fn
        self.branch = branch
        self.state = state
        if branch is not None:
            self.w_out = branch.out.weight
            self.post_w = branch.post_norm.weight
            self.post_eps = branch.post_norm.eps if branch.post_norm.eps is not None else torch.finfo(torch.float32).eps
            self.d_model = branch.out.out_features
            self.fusion = branch.cfg.fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.concat:
            proj = F.linear(x, self.w_in)
            h = self.act(proj[..., : self.ffn]) * proj[..., self.ffn : 2 * self.ffn]
            gate_logits = proj[..., 2 * self.ffn :]
        else:
            h = self.act(F.linear(x, self.w_gate_ffn)) * F.linear(x, self.w_up)
            gate_logits = F.linear(x, self.w_gate_mem) if self.branch is not None else None
        if self.branch is None:
            return F.linear(h, self.w_down)
        rows = self.state.layer_rows(self.branch.slot)
        z = F.linear(fuse(rows.to(x.dtype), gate_logits, self.fusion), self.w_out)
        y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.post_eps) * self.post_w
        # down(h) + y in one BLAS call: y is the addmm's bias input.
        return torch.addmm(y.reshape(-1, self.d_model), h.reshape(-1, h.shape[-1]), self.w_down.t()).view_as(y)


def fuse_meki_ffn(model: nn.Module, concat_gate_up: bool = False) -> int:
    """Replace FFN + parallel MeKi by FusedGatedMLP where possible (external tables, parallel_ffn
    position, gated MLP). Removes the now redundant hooks. Returns the number of layers fused."""
    state = meki_state(model)
    if state is None or not state.external or state.cfg.position != "parallel_ffn":
        return 0
    fam = state.family
    layers = model.get_decoder().layers if fam.layers == "model.layers" else None
    fused = 0
    for idx, branch in meki_branches(model):
        layer = layers[idx]
        mlp = getattr(layer, fam.mlp)
        if not _is_gated_mlp(mlp):
            continue
        # The MeKi hook sits on this MLP module: dropping the module drops the hook with it.
        setattr(layer, fam.mlp, FusedGatedMLP(mlp, branch, state, concat_gate_up))
        fused += 1
    return fused


def fuse_gate_up(model: nn.Module) -> int:
    """The same gate/up concatenation for a dense model (a like-for-like baseline)."""
    n = 0
    for layer in model.get_decoder().layers:
        if _is_gated_mlp(getattr(layer, "mlp", None)):
            layer.mlp = FusedGatedMLP(layer.mlp, concat_gate_up=True)
            n += 1
    return n
