"""Task groupings by factor similarity, for HydraOpt's shared factors.

Similarity of the input sides of two updates: the cosine between the operators dW_i^T dW_i and
dW_j^T dW_j, i.e. ||dW_i dW_j^T||_F^2 normalised (invariant to the A/B gauge, computed from r x r
blocks). Groups come from Ward agglomerative clustering in that kernel's feature space: Ward
minimises the same within-group scatter as k-means, and its cuts are NESTED (the K+1 grouping
refines the K grouping), which is what makes HydraOpt's error non-increasing in the budget. A
constraint (a coarser grouping) keeps sub-groups inside groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage

_BIG = 1e6  # distance between tasks that a constraint keeps apart: merged last


def input_side_kernel(Z: torch.Tensor) -> np.ndarray:
    """Z: (N, r, d) with Z_t^T Z_t = dW_t^T dW_t. Returns the normalised N x N kernel in [0, 1]."""
    N, r, d = Z.shape
    flat = Z.reshape(N * r, d).float()  # grouping is a heuristic: float32 is plenty
    Y = (flat @ flat.T).reshape(N, r, N, r)
    K = (Y**2).sum(dim=(1, 3)).double()
    diag = K.diagonal().clamp_min(1e-300)
    K = K / torch.sqrt(diag[:, None] * diag[None, :])
    return K.clamp(0, 1).numpy()


@dataclass(frozen=True)
class Dendrogram:
    """Merge order of N tasks; `cut(K)` applies the first N-K merges (exactly K groups)."""

    n: int
    merges: np.ndarray  # (N-1, 2) cluster ids as in scipy's linkage

    def cut(self, k: int) -> np.ndarray:
        k = max(1, min(int(k), self.n))
        parent = list(range(2 * self.n - 1))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for step in range(self.n - k):
            a, b = (int(x) for x in self.merges[step])
            new = self.n + step
            parent[find(a)] = new
            parent[find(b)] = new
        roots = [find(i) for i in range(self.n)]
        labels, seen = np.empty(self.n, dtype=np.int64), {}
        for i, root in enumerate(roots):  # canonical numbering: by first task of each group
            labels[i] = seen.setdefault(root, len(seen))
        return labels


def ward_dendrogram(kernel: np.ndarray, constraint: np.ndarray | None = None) -> Dendrogram:
    """Ward linkage on the kernel-induced distances sqrt(2 - 2 K_ij); tasks with different
    `constraint` labels are merged only after everything else."""
    n = kernel.shape[0]
    if n == 1:
        return Dendrogram(1, np.zeros((0, 2), dtype=np.int64))
    D = np.sqrt(np.clip(2.0 - 2.0 * kernel, 0.0, None))
    if constraint is not None:
        D = np.where(constraint[:, None] == constraint[None, :], D, _BIG)
    np.fill_diagonal(D, 0.0)
    iu = np.triu_indices(n, 1)
    Zl = linkage(D[iu], method="ward")
    return Dendrogram(n, Zl[:, :2].astype(np.int64))


def groups_of(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == g) for g in range(int(labels.max()) + 1)]
