"""The decode-time form of a gated FFN with a parallel MeKi branch reading its rows from ROM.

At batch 1 the branch adds under 2% of the multiply-adds, but in eager PyTorch it also adds about ten
small ops per layer, and their fixed costs were most of its measured decode overhead. So for the
deployed model each layer runs

    o = x @ [W_gate_ffn; W_up; W_gate_mem]^T       one matmul: all three read x
    h, y = act(o_gate) * o_up,  RMSNorm_post(W_out fuse(e, o_mem))     one C call
    out = h @ W_down^T + y                          the down matmul, y as its bias

which is FFN(x) + MeKi(x). The C kernel (kernels/ffn_mid.c says why it exists) has the same
algebra in eager PyTorch as the fallback. W_gate_mem moves into the first matmul's weight; the
originals are released, so RAM does not grow. The FFN alone (no MeKi) can be fused the same way
(`fuse_dense_ffn`), the benchmark's control for what the layout is worth without MeKi.
"""

from __future__ import annotations

import ctypes
import gc

import torch
import torch.nn.functional as F
from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.attach import MekiState, meki_branches, meki_state
from romscale.meki.layer import MekiBranch, fuse
from romscale.rom.kernel import FUSION_CODES, MAX_D_MEM, FfnParams, ffn_kernel
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
        self.act_fn = F.silu if _is_silu(mlp.act_fn) else mlp.act_fn  # skip a module call per layer
        self.state, self.mem_layers = state, mem_layers
        parts = [gate, up] + ([branch.gate.weight.detach()] if branch is not None else [])
        with torch.no_grad():
            self.register_buffer("w_in", torch.cat(parts), persistent=False)
        self.register_buffer("w_down", down, persistent=False)
        if branch is not None:
            post = branch.post_norm.weight
            self.register_buffer("w_out", branch.out.weight.detach().contiguous(), persistent=False)
            self.register_buffer("w_post", (post.detach() if post is not None else torch.ones(d)).contiguous(), persistent=False)
            eps = branch.post_norm.eps if branch.post_norm.eps is not None else torch.finfo(down.dtype).eps
            self.slot, self.fusion = branch.slot, branch.cfg.fusion
        else:
            self.w_out = self.w_post = None
            eps, self.slot, self.fusion = 0.0, 0, "add_sigmoid"
        self.eps = float(eps)
        self.kernel = ffn_kernel() if self.act_fn is F.silu and m <= MAX_D_MEM else None
        # Strides in floats; mem_layers: how many layers' rows each token's ROM row holds.
        self.params = FfnParams(f, m, d, 2 * f + m, mem_layers * m, self.eps, FUSION_CODES[self.fusion])
        self._params_ptr = ctypes.addressof(self.params)

    def _rows(self, lead: torch.Size) -> torch.Tensor:
        rows = self.state.current_rows()
        if rows is None:
            raise RomscaleError("this MeKi model reads its table from storage, but no ROM table is connected")
        if rows.shape != (*lead, self.mem_layers, self.d_mem):  # the kernel reads by these strides
            raise RomscaleError(
                f"MeKi rows of shape {tuple(rows.shape)} for hidden states {tuple(lead)}: expected "
                f"{(*lead, self.mem_layers, self.d_mem)}"
            )
        return rows

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        # One token (a decode step): one matrix-vector product over the concatenated weight. Several
        # (prefill): the BLAS packs the weight for a matrix-matrix product and keeps the packing
        # buffer, sized by the largest weight it has seen (it showed in the memory probe at d_mem
        # 256), so split over views it stays the dense model's size.
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.w_in)
        f = self.ffn_dim
        parts = self.w_in.split([f, f, self.d_mem] if self.d_mem else [f, f])
        return torch.cat([F.linear(x, w) for w in parts], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RomscaleError("the fused decode path is inference-only: run it under torch.no_grad()")
        f, m, d = self.ffn_dim, self.d_mem, self.d_model
        o = self._project_in(x)
        lead = o.shape[:-1]
        rows = self._rows(lead) if m else None
        if self.kernel is not None and o.dtype == torch.float32 and (rows is None or (rows.dtype == torch.float32 and rows.is_contiguous())):
            h = o.new_empty(*lead, f)
            if not m:
                self.kernel(self._params_ptr, o.data_ptr(), None, None, None, h.data_ptr(), None, h.numel() // f)
                return F.linear(h, self.w_down)
            y = o.new_empty(*lead, d)
            self.kernel(
                self._params_ptr, o.data_ptr(), rows.data_ptr() + 4 * self.slot * m, self.w_out.data_ptr(),
                self.w_post.data_ptr(), h.data_ptr(), y.data_ptr(), h.numel() // f,
            )  # fmt: skip
        else:  # eager PyTorch, the same algebra (no compiler here, or another dtype)
            h = self.act_fn(o[..., :f]) * o[..., f : 2 * f]
            if not m:
                return F.linear(h, self.w_down)
            v = fuse(rows[..., self.slot, :].to(o.dtype), o[..., 2 * f :], self.fusion)
            y = F.rms_norm(F.linear(v, self.w_out), (d,), self.w_post, self.eps)
        if y.numel() == d:  # one token: y rides along as the matmul's bias
            return F.linear(h, self.w_down, y.view(d))
        return F.linear(h, self.w_down).add_(y)


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
    gc.collect()  # the replaced modules sit in reference cycles (hook closures): free them now
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
    gc.collect()
    release_free_memory()
    return fused
