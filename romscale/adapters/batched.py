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


def truncate_group(merged: torch.Tensor, rank: int, eig: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Best rank-`rank` factors of M dense (d_out, d_in) updates stacked as (M, d_out, d_in): one
    batched float64 Gram and its leading eigenvectors (`eig`: see top_eigenvectors); [(A, B)]
    float32, padded with zeros to `rank`."""
    M, d_out, d_in = merged.shape
    r = min(rank, d_out, d_in)
    Md = merged.double()
    if d_out <= d_in:
        U = top_eigenvectors(Md @ Md.transpose(1, 2), r, method=eig)  # (M, d_out, r)
        Bn, An = U, U.transpose(1, 2) @ Md
    else:
        V = top_eigenvectors(Md.transpose(1, 2) @ Md, r, method=eig)  # (M, d_in, r)
        Bn, An = Md @ V, V.transpose(1, 2)
    out = []
    for m in range(M):
        a, b = An[m].float(), Bn[m].float()
        if r < rank:  # zero rows / columns: the stored rank stays `rank`, the product is unchanged
            a = torch.cat([a, a.new_zeros(rank - r, d_in)])
            b = torch.cat([b, b.new_zeros(d_out, rank - r)], 1)
        out.append((a, b))
    return out


def top_eigenvectors(G: torch.Tensor, k: int, method: str = "auto", tol: float = 1e-10, max_iter: int = 400) -> torch.Tensor:
    """The k leading eigenvectors, largest first, of symmetric PSD float64 matrices G (M, n, n).

    method "eigh": one batched full eigh. "subspace": block subspace iteration with Rayleigh-Ritz on
    p = max(32, k + 8) columns (Golub & Van Loan, alg. 8.2.7), run until every leading Ritz pair has
    ||G x - theta x|| <= tol * theta_max; a matrix still short of that after max_iter steps gets the
    full eigh. "auto": subspace on accelerators, eigh on the CPU. Why: on CUDA a batched eigh of
    n > 32 is a loop of full syevd calls (~20 ms each at n = 576), most of a TIES merge's time in
    D2C's loop on an H200, while the iteration is a few batched matmuls and p x p eighs."""
    if method not in ("auto", "eigh", "subspace"):
        raise ValueError(f"method must be auto, eigh or subspace, got {method!r}")
    n = G.shape[-1]
    p = min(n, max(32, k + 8))  # 32 for k <= 24: CUDA batches p x p eighs up to 32 in one call
    if method == "eigh" or (method == "auto" and G.device.type == "cpu") or 2 * p >= n:
        return torch.linalg.eigh(G)[1][..., n - k :].flip(-1)
    gen = torch.Generator(device=G.device).manual_seed(0)  # a fixed start: the same result every run
    Q = _orthonormal(G @ torch.randn(G.shape[0], n, p, generator=gen, device=G.device, dtype=G.dtype))
    done = torch.zeros(G.shape[0], dtype=torch.bool, device=G.device)
    for it in range(max_iter):
        Y = G @ Q
        theta, W = torch.linalg.eigh(Q.transpose(1, 2) @ Y)  # Rayleigh-Ritz, ascending
        X, Wk, th = Q @ W[..., p - k :], W[..., p - k :], theta[..., p - k :]
        if it % 4 == 3 or it == max_iter - 1:  # the residual check syncs with the device: not every step
            res = (Y @ Wk - X * th[:, None, :]).norm(dim=1) / theta[:, -1:].abs().clamp_min(1e-300)
            done = res.amax(dim=1) <= tol
            if bool(done.all()):
                break
        Q = _orthonormal(Y @ W)
    else:
        if not bool(done.all()):  # the few that did not converge: the exact path
            X[~done] = torch.linalg.eigh(G[~done])[1][..., n - k :]
    return X.flip(-1)


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each Y's columns: Cholesky QR twice (batched small kernels), or a
    Householder QR where the Gram is not positive definite (rank-deficient Y)."""
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Y.transpose(1, 2) @ Y)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y).Q
        Y = torch.linalg.solve_triangular(L, Y.transpose(1, 2), upper=False).transpose(1, 2)
    return Y
