"""TIES over many modules at once, for accelerators.

On a GPU the per-module merge (romscale.adapters.merge) is latency-bound: 120 modules of a
SmolLM2-sized LoRA, each a few small kernels and one 576 x 576 eigh, took 0.8 s on an H200
(results/merge_device_gpu.json), the bottleneck of D2C's loop there. Here the modules of one shape
go through the same algebra as one batch: one matmul for every dense update, one top-k for every
trim, the sign election and disjoint mean as tensor ops, one batched Gram and one batched eigh for
the rank-r truncation. Same results as the per-module path up to float rounding (tested)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from romscale.adapters.factors import ModuleStack


def ties_group(stacks: Sequence[ModuleStack], weights: torch.Tensor, *, density: float, sign_method: str,
               rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """TIES-merge modules of one shape (same d_out, d_in and task ranks), each truncated to `rank`:
    [(A, B)] in the order of `stacks`, float32, on the stacks' device."""
    A = torch.stack([torch.stack([a.float() for a in s.A]) for s in stacks])  # (M, N, r, d_in)
    B = torch.stack([torch.stack([b.float() for b in s.B]) for s in stacks])  # (M, N, d_out, r)
    scale = torch.tensor([s.scaling for s in stacks], dtype=torch.float32, device=A.device)  # (M, N)
    D = (B @ A) * scale[..., None, None]  # every dense update, (M, N, d_out, d_in)
    M, N, d_out, d_in = D.shape
    flat = D.view(M * N, -1)
    if density < 1:  # each update trimmed to its own top-k magnitudes, as the per-module path
        k = int(density * flat.shape[1])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
        flat.mul_(keep)
    mag = D.sum(1) if sign_method == "total" else D.sign().sum(1)
    sgn = torch.where(mag >= 0, 1.0, -1.0)  # (M, d_out, d_in)
    y = (D * sgn[:, None]).relu_()  # the entries that agree with the elected sign, as |x|
    count = (y > 0).sum(1, dtype=torch.float32).clamp_min(1.0)
    merged = sgn * torch.einsum("n,mnij->mij", weights.to(D.device, torch.float32), y) / count
    del D, y
    return truncate_group(merged, rank)


def truncate_group(merged: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Best rank-`rank` factors of M dense (d_out, d_in) updates stacked as (M, d_out, d_in): one
    batched Gram and one batched float64 eigh; [(A, B)] float32, padded with zeros to `rank`."""
    M, d_out, d_in = merged.shape
    r = min(rank, d_out, d_in)
    Md = merged.double()
    if d_out <= d_in:
        U = torch.linalg.eigh(Md @ Md.transpose(1, 2))[1][..., d_out - r :].flip(-1)  # (M, d_out, r)
        Bn, An = U, U.transpose(1, 2) @ Md
    else:
        V = torch.linalg.eigh(Md.transpose(1, 2) @ Md)[1][..., d_in - r :].flip(-1)  # (M, d_in, r)
        Bn, An = Md @ V, V.transpose(1, 2)
    out = []
    for m in range(M):
        a, b = An[m].float(), Bn[m].float()
        if r < rank:  # zero rows / columns: the stored rank stays `rank`, the product is unchanged
            a = torch.cat([a, a.new_zeros(rank - r, d_in)])
            b = torch.cat([b, b.new_zeros(d_out, rank - r)], 1)
        out.append((a, b))
    return out
