"""Factored-form linear algebra for low-rank updates dW = B @ A.

Norms, inner products and errors go through r x r Gram matrices, and truncation to rank k goes
through QR factors, so the d_out x d_in product is only formed when it is not larger than the
factors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch


@dataclass(frozen=True)
class ModuleStack:
    """One module's factors across the N tasks of a bank. B is unscaled; `scaling[t]` applies."""

    name: str
    A: list[torch.Tensor]  # (r_t, d_in)
    B: list[torch.Tensor]  # (d_out, r_t)
    scaling: list[float]

    @property
    def n(self) -> int:
        return len(self.A)

    @property
    def d_in(self) -> int:
        return int(self.A[0].shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B[0].shape[0])

    @property
    def ranks(self) -> list[int]:
        return [int(a.shape[0]) for a in self.A]

    def to(self, device: torch.device | str) -> "ModuleStack":
        """The same stack with its factors on `device`."""
        return ModuleStack(self.name, [a.to(device) for a in self.A], [b.to(device) for b in self.B], list(self.scaling))

    def delta(self, t: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Same operation order as PEFT's get_delta_weight: (B @ A) * scaling.
        return (self.B[t].to(dtype) @ self.A[t].to(dtype)) * self.scaling[t]

    def deltas(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """All dense updates, (N, d_out, d_in), each computed exactly as `delta` (so bit for bit as
        PEFT's: magnitude trimming then keeps the same entries). Pass a reused `out` for large
        stacks: fresh allocations above glibc's mmap threshold page-fault on every call."""
        D = out if out is not None else torch.empty(self.n, self.d_out, self.d_in, dtype=dtype, device=self.A[0].device)
        for t in range(self.n):
            torch.matmul(self.B[t].to(dtype), self.A[t].to(dtype), out=D[t])
            D[t].mul_(self.scaling[t])
        return D

    def padded(self, dtype: torch.dtype = torch.float64, fold_scaling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (N, r_max, d_in), B (N, d_out, r_max)); zero padding leaves every B @ A unchanged."""
        r = max(self.ranks)
        A = torch.zeros(self.n, r, self.d_in, dtype=dtype, device=self.A[0].device)
        B = torch.zeros(self.n, self.d_out, r, dtype=dtype, device=self.A[0].device)
        for t in range(self.n):
            k = self.ranks[t]
            A[t, :k] = self.A[t].to(dtype)
            B[t, :, :k] = self.B[t].to(dtype) * (self.scaling[t] if fold_scaling else 1.0)
        return A, B


def inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)) without forming d_out x d_in. Batched over leading dims."""
    return ((B1.transpose(-1, -2) @ B2) * (A1 @ A2.transpose(-1, -2))).sum(dim=(-1, -2))


def sq_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return inner(B, A, B, A)


def rel_error_sq(B: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ah: torch.Tensor) -> torch.Tensor:
    """||B A - Bh Ah||^2 / ||B A||^2 in factored form (nan where ||B A|| = 0). Use float64 inputs:
    the expansion n - 2<.,.> + m cancels when the error is small."""
    n = sq_norm(B, A)
    err = n - 2 * inner(B, A, Bh, Ah) + sq_norm(Bh, Ah)
    return err.clamp_min(0) / n


def _top_eigenvectors(G: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors of a symmetric float64 matrix, largest first. On the CPU LAPACK
    computes just those k; on an accelerator a full eigh is one fast call (no subset driver there)."""
    n = G.shape[0]
    if G.device.type == "cpu":
        _, V = scipy.linalg.eigh(G.numpy(), subset_by_index=[n - k, n - 1])
        return torch.from_numpy(V[:, ::-1].copy())
    return torch.linalg.eigh(G)[1][:, n - k :].flip(1)


def truncate_dense(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (B, A) of a dense matrix (same product as PEFT's U S, Vh)."""
    d_out, d_in = M.shape
    k = min(rank, d_out, d_in)
    if 4 * k <= min(d_out, d_in):
        # Only k singular directions are needed: the top-k eigenpairs of the smaller Gram, in
        # float64 so that squaring the spectrum costs no accuracy that matters.
        Md = M.double()
        if d_out <= d_in:
            U = _top_eigenvectors(Md @ Md.T, k)
            B, A = U, U.T @ Md
        else:
            V = _top_eigenvectors(Md.T @ Md, k)
            B, A = Md @ V, V.T
        return _pad_rank(B.to(M.dtype), A.to(M.dtype), rank)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = min(rank, S.shape[0])
    B, A = U[:, :k] * S[:k], Vh[:k]
    return _pad_rank(B, A, rank)


def truncate_factored(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of B @ A, returned as (B', A') with exactly `rank` columns/rows
    (zero-padded when B @ A has lower rank)."""
    R = A.shape[0]
    d_out, d_in = B.shape[0], A.shape[1]
    if R >= min(d_out, d_in):
        return truncate_dense(B @ A, rank)
    # B = Qb Rb, A^T = Qa Ra  =>  B A = Qb (Rb Ra^T) Qa^T: only an R x R SVD is needed.
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, R)
    Bn = Qb @ (U[:, :k] * S[:k])
    An = Vh[:k] @ Qa.T
    return _pad_rank(Bn, An, rank)


def _pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = A.shape[0]
    if k >= rank:
        return B.contiguous(), A.contiguous()
    Bp = torch.zeros(B.shape[0], rank, dtype=B.dtype, device=B.device)
    Ap = torch.zeros(rank, A.shape[1], dtype=A.dtype, device=A.device)
    Bp[:, :k], Ap[:k] = B, A
    return Bp, Ap


def top_eigh(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a symmetric PSD matrix, descending (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh(S)
    vals, vecs = vals.flip(0), vecs.flip(1)
    return vals[:k].clamp_min(0), vecs[:, :k]


def top_eigvals(S: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The k largest eigenvalues of a symmetric PSD matrix, descending, clamped at 0."""
    n = S.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=S.dtype)
    return torch.linalg.eigvalsh(S).flip(0)[:k].clamp_min(0)


def psd_sqrt_factor(H: torch.Tensor, tol: float = 1e-13) -> torch.Tensor:
    """L with L @ L^T = H for a symmetric PSD H (columns for null directions dropped)."""
    vals, vecs = torch.linalg.eigh(H)
    keep = vals > tol * max(float(vals.max()), 0.0)
    if not bool(keep.any()):
        return torch.zeros(H.shape[0], 0, dtype=H.dtype)
    return vecs[:, keep] * vals[keep].sqrt()


def complete_rows(Q: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend orthonormal rows Q (m x d, m <= k <= d) to k orthonormal rows (directions with no energy)."""
    m, d = Q.shape
    if m >= k:
        return Q[:k]
    g = generator or torch.Generator().manual_seed(0)
    extra = torch.randn(k - m, d, generator=g, dtype=torch.float64).to(Q.dtype)
    extra = extra - (extra @ Q.T) @ Q
    Qe, _ = torch.linalg.qr(extra.T)
    return torch.cat([Q, Qe.T[: k - m]], dim=0)
