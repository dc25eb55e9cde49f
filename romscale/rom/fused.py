"""The decode-time form of a gated FFN with a parallel MeKi branch reading its rows from ROM.

At batch 1 the branch adds under 2% of the multiply-adds, but in eager PyTorch it also adds about ten
small ops per layer, and their fixed costs were most of its measured decode overhead. So for the
deployed model each layer runs

    o   = x @ [W_gate_ffn; W_up; W_gate_mem]^T            one matmul: all three read x
    buf = [ act(o_gate) * o_up ,  fuse(e, o_mem) / hypot(|R v|, sqrt(d eps)) ]
    y   = buf @ [W_down, sqrt(d) diag(w_post) W_out]^T     one matmul: FFN + MeKi output

which equals FFN(x) + RMSNorm_post(W_out fuse(e, W_gate_mem x)) because |W_out v| = |R v| for
W_out = QR. Everything between the two matmuls is one call into a small C kernel
(kernels/ffn_mid.c says why), with the same algebra in eager PyTorch as the fallback. The weights are re-laid out once at fuse time; the
originals are released, so RAM does not grow. The FFN alone (no MeKi) can be fused the same way
(`fuse_dense_ffn`), so benchmarks can also show what the layout does without MeKi.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.attach import MekiState, meki_branches, meki_state
from romscale.meki.layer import MekiBranch, fuse
from romscale.rom.kernel import FUSION_CODES, FfnParams, ffn_kernel
from romscale.rom.pagecache import release_free_memory


def _is_gated_mlp(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and not any(
        getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
    )


def _is_silu(act: nn.Module) -> bool:
    """By behaviour, not class: transformers wraps SiLU in its own module classes."""
    probe = torch.linspace(-6, 6, 13)
    with torch.no_grad():
        return torch.equal(act(probe), F.silu(probe))


class FusedMekiMLP(nn.Module):
    """down(act(gate(x)) * up(x)) [+ MeKi(x) with rows from the ROM row source]. Inference only."""

    def __init__(
        self, mlp: nn.Module, branch: MekiBranch | None = None, state: MekiState | None = None, mem_layers: int = 0
    ) -> None:
        super().__init__()
        gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        f, d = gate.shape[0], down.shape[0]
        m = branch.cfg.d_mem if branch is not None else 0
        self.ffn_dim, self.d_model, self.d_mem = f, d, m
        self.act = mlp.act_fn
        self.act_fn = F.silu if _is_silu(self.act) else self.act  # skip a module call per layer
        self.state = state
        with torch.no_grad():
            if branch is None:
                self.register_buffer("w_in", torch.cat([gate, up]), persistent=False)
                self.register_buffer("w_down", down, persistent=False)
                self.register_buffer("r", torch.empty(0, 0, dtype=down.dtype), persistent=False)
                eps, self.slot, self.fusion = 0.0, 0, "add_sigmoid"
            else:
                w_out = branch.out.weight.detach()
                post = branch.post_norm.weight.detach() if branch.post_norm.weight is not None else torch.ones(d)
                self.register_buffer("w_in", torch.cat([gate, up, branch.gate.weight.detach()]), persistent=False)
                self.register_buffer("w_down", torch.cat([down, (post * d**0.5)[:, None] * w_out], 1), persistent=False)
                # |W_out v| = |R v| with R min(d, d_mem) x d_mem (QR in float64 for accuracy).
                self.register_buffer("r", torch.linalg.qr(w_out.double(), mode="r").R.to(w_out.dtype).contiguous(), persistent=False)
                eps = branch.post_norm.eps if branch.post_norm.eps is not None else torch.finfo(torch.float32).eps
                self.slot, self.fusion = branch.slot, branch.cfg.fusion
        self.eps_term = math.sqrt(d * eps)
        self.register_buffer("eps_tensor", torch.tensor(self.eps_term, dtype=down.dtype), persistent=False)
        self.kernel = ffn_kernel() if self.act_fn is F.silu else None
        # Strides in floats; mem_layers: how many layers' rows each token's ROM row holds.
        self.params = FfnParams(f, m, 2 * f + m, mem_layers * m, f + m, self.r.shape[0], self.eps_term, FUSION_CODES[self.fusion])
        self._params_ptr = ctypes.addressof(self.params)

    def _rows(self, lead: torch.Size) -> torch.Tensor:
        rows = self.state.current_rows()
        if rows is None:
            raise RomscaleError("this MeKi model reads its table from storage, but no ROM table is connected")
        if rows.shape[:-2] != lead:
            raise RomscaleError(f"MeKi rows for token ids of shape {tuple(rows.shape[:-2])} but hidden states {tuple(lead)}")
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RomscaleError("the fused decode path is inference-only: run it under torch.no_grad()")
        f, m = self.ffn_dim, self.d_mem
        o = F.linear(x, self.w_in)
        rows = self._rows(o.shape[:-1]) if m else None
        if self.kernel is not None and o.dtype == torch.float32 and o.is_contiguous() and (rows is None or (rows.dtype == torch.float32 and rows.is_contiguous())):
            mid = o.new_empty(*o.shape[:-1], f + m)
            e_ptr = rows.data_ptr() + 4 * self.slot * m if m else None
            self.kernel(self._params_ptr, o.data_ptr(), e_ptr, self.r.data_ptr(), mid.data_ptr(), o.numel() // o.shape[-1])
            return F.linear(mid, self.w_down)
        # Eager PyTorch, the same algebra (no compiler here, or another dtype).
        h = self.act_fn(o[..., :f]) * o[..., f : 2 * f]
        if not m:
            return F.linear(h, self.w_down)
        v = fuse(rows[..., self.slot, :].to(o.dtype), o[..., 2 * f :], self.fusion)
        norm = torch.linalg.vector_norm(v @ self.r.t(), dim=-1, keepdim=True)
        return F.linear(torch.cat([h, v / torch.hypot(norm, self.eps_tensor)], -1), self.w_down)


def fuse_meki_ffn(model: nn.Module) -> int:
    """Replace FFN + parallel MeKi by FusedMekiMLP where possible (external tables, parallel_ffn
    position, gated MLP). The model becomes a runtime form (no export or training). Returns the
    number of layers fused."""
    state = meki_state(model)
    if state is None or not state.external or state.cfg.position != "parallel_ffn":
        return 0
    layers = model.get_decoder().layers
    fused = 0
    branches = meki_branches(model)
    for idx, branch in branches:
        mlp = getattr(layers[idx], state.family.mlp)
        if not _is_gated_mlp(mlp):
            continue
        # The MeKi hook sits on this MLP module: dropping the module drops the hook with it. The
        # branch's own projections now live, re-laid out, in the fused module: drop them too.
        setattr(layers[idx], state.family.mlp, FusedMekiMLP(mlp, branch, state, len(branches)))
        branch.gate = branch.out = None
        fused += 1
    release_free_memory()
    return fused


def fuse_dense_ffn(model: nn.Module) -> int:
    """The same FFN layout for a model without MeKi (one matmul for gate and up): the benchmark's
    control for how much of the fused speed comes from the layout rather than from MeKi."""
    fused = 0
    for layer in model.get_decoder().layers:
        if hasattr(layer, "mlp") and _is_gated_mlp(layer.mlp):
            layer.mlp = FusedMekiMLP(layer.mlp)
            fused += 1
    release_free_memory()
    return fused
