"""The MeKi branch of one decoder layer, in its training form and its folded (deployed) form.

Training form (meki.md): e = alpha * RMSNorm_mix(M[x] + beta * G(E[x])), g = W_gate h, v = fuse(e, g),
y = RMSNorm_post(W_out v). Folded form: e = M~[x], a row lookup in one precomputed table.
`expert_vector` is the single place the expert formula lives; the training forward and the fold both
call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from romscale.errors import RomscaleError
from romscale.meki.config import MekiConfig


class SwiGLU(nn.Module):
    """G: d -> hidden -> d_mem with a SiLU-gated hidden layer (as in Llama's FFN)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MekiMemory(nn.Module):
    """Everything that folds away: static table M, dynamic projection G, alpha, beta, mix norm."""

    def __init__(self, cfg: MekiConfig, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.static = nn.Embedding(vocab_size, cfg.d_mem) if cfg.has_static else None
        if cfg.has_dynamic:
            self.dynamic = (
                SwiGLU(d_model, d_model // 2, cfg.d_mem)
                if cfg.dynamic_proj == "swiglu"
                else nn.Linear(d_model, cfg.d_mem, bias=False)
            )
            self.beta = nn.Parameter(torch.ones(()))
        else:
            self.dynamic = None
            self.beta = None
        self.alpha = nn.Parameter(torch.ones(()))
        self.mix_norm = nn.RMSNorm(cfg.d_mem, eps=cfg.rms_eps)


def expert_vector(
    memory: MekiMemory, static_rows: torch.Tensor | None, embed_rows: torch.Tensor | None
) -> torch.Tensor:
    """e = alpha * RMSNorm_mix(m_static + beta * G(E_rows)) for the given rows (any leading shape).

    Used with the rows of the current tokens during training and with every vocabulary row by the
    fold, so the two forms cannot drift apart.
    """
    m = None
    if memory.static is not None:
        m = static_rows
    if memory.dynamic is not None:
        dyn = memory.beta * memory.dynamic(embed_rows)
        m = dyn if m is None else m + dyn
    return memory.alpha * memory.mix_norm(m)


def fuse(e: torch.Tensor, gate_logits: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine the expert vector with the hidden-state gate (the paper's four fusion variants)."""
    if fusion == "add_sigmoid":
        return e + torch.sigmoid(gate_logits)
    if fusion == "mul_sigmoid":
        return e * torch.sigmoid(gate_logits)
    if fusion == "add_silu":
        return e + F.silu(gate_logits)
    if fusion == "mul_silu":
        return e * F.silu(gate_logits)
    raise RomscaleError(f"unknown MeKi fusion {fusion!r}")


class MekiBranch(nn.Module):
    """MeKi for one layer. Holds `memory` (training form) or `table` (folded form), never both."""

    SEQUENTIAL = ("after_attn", "after_ffn")

    def __init__(
        self, cfg: MekiConfig, d_model: int, vocab_size: int, folded: bool = False, external: bool = False
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.slot = 0  # position among the model's MeKi layers (its slice of a packed ROM row)
        self.gate = nn.Linear(d_model, cfg.d_mem, bias=False)
        self.out = nn.Linear(cfg.d_mem, d_model, bias=False)
        self.post_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps)
        # Sequential placements are sublayers of their own and need their own pre-norm; parallel
        # ones read the normalised input the attention/FFN already gets (h in the paper).
        self.in_norm = nn.RMSNorm(d_model, eps=cfg.rms_eps) if cfg.position in self.SEQUENTIAL else None
        # external: the folded table lives on storage and rows arrive through `forward(rows=...)`.
        self.external = external
        if external:
            self.memory = None
            self.table = None
        elif folded:
            self.memory = None
            self.table = nn.Parameter(torch.zeros(vocab_size, cfg.d_mem))
        else:
            self.memory = MekiMemory(cfg, d_model, vocab_size)
            self.table = None
        self.reset_parameters()

    @property
    def folded(self) -> bool:
        return self.table is not None or self.external

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.out.weight, std=std)
        if self.cfg.zero_init_output:
            self.post_norm.weight.zero_()
        if self.memory is not None:
            for p in self.memory.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=std)

    def expert(self, ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return F.embedding(ids, self.table)
        static_rows = self.memory.static(ids) if self.memory.static is not None else None
        embed_rows = F.embedding(ids, embedding_weight) if self.memory.dynamic is not None else None
        return expert_vector(self.memory, static_rows, embed_rows)

    def forward(
        self, h: torch.Tensor, ids: torch.Tensor, embedding_weight: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`rows`: this layer's expert vectors read from a ROM table (external form)."""
        if ids.shape != h.shape[:-1]:
            raise RomscaleError(
                f"MeKi token ids have shape {tuple(ids.shape)} but the hidden states {tuple(h.shape)}; "
                "call the model with input_ids for the same positions"
            )
        if self.in_norm is not None:
            h = self.in_norm(h)
        if rows is not None:
            e = rows.to(h.dtype)
        elif self.external:
            raise RomscaleError("this MeKi branch reads its table from storage, but no ROM table is connected")
        else:
            e = self.expert(ids, embedding_weight).to(h.dtype)
        v = fuse(e, self.gate(h), self.cfg.fusion)
        return self.post_norm(self.out(v))

    @torch.no_grad()
    def fold_(self, embedding_weight: torch.Tensor, chunk_rows: int = 8192) -> None:
        """Replace the training form by the table M~ = expert_vector(every vocabulary row)."""
        if self.folded:
            return
        mem = self.memory
        rows = []
        for start in range(0, self.vocab_size, chunk_rows):
            stop = min(start + chunk_rows, self.vocab_size)
            static_rows = mem.static.weight[start:stop] if mem.static is not None else None
            embed_rows = embedding_weight[start:stop] if mem.dynamic is not None else None
            rows.append(expert_vector(mem, static_rows, embed_rows))
        table = torch.cat(rows)
        dtype = self.gate.weight.dtype
        self.memory = None
        self.table = nn.Parameter(table.to(dtype))

    def extra_repr(self) -> str:
        c = self.cfg
        form = "external" if self.external else "folded" if self.folded else "training"
        return f"{form}, vocab={self.vocab_size}, d_mem={c.d_mem}, memory={c.memory}, position={c.position}, fusion={c.fusion}"
