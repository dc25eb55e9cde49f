"""Elementwise merge operations (trim, random drop, sign election, disjoint mean), written to give
the same results as peft.utils.merge_utils so that merges can be checked against PEFT.

- magnitude trimming keeps exactly k = int(density * numel) entries, the ones torch.topk picks
  (PEFT's magnitude_based_pruning), ties at the k-th magnitude included; the threshold comes from a
  radix select, and topk itself only runs when entries tie at it (common with fp16 factors);
- random drops take an explicit generator: a torch.Generator reproduces PEFT's global-RNG stream
  draw for draw; a numpy Generator ("fast" mode) draws 16-bit uniforms, ~10x faster for the dense
  updates of update-space DARE (keep probability quantised to 1/65536).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from romscale.errors import RomscaleError

SignMethod = Literal["total", "frequency"]
Rng = torch.Generator | np.random.Generator


def _check_density(density: float) -> None:
    # Like PEFT, a density >= 1 means "keep everything".
    if not 0.0 <= density:
        raise RomscaleError(f"density must be in [0, 1], got {density}")


def kth_largest_abs(t: torch.Tensor, k: int) -> float:
    """The k-th largest |x| (1 <= k <= numel), exactly. float32 uses a radix select: non-negative
    floats order like their int32 bit patterns, so a 2^15-bucket histogram of the top bits finds
    the bucket holding the answer and only that bucket is partitioned."""
    a = t.detach().abs().reshape(-1)
    n = a.numel()
    if a.dtype != torch.float32:
        a_np = a.double().numpy()
        return float(np.partition(a_np, n - k)[n - k])
    a = a.contiguous()
    hi = a.view(torch.int32) >> 16
    counts = torch.bincount(hi, minlength=1 << 15)
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b]: entries in buckets >= b
    b = int(torch.nonzero(at_least >= k).max())
    above = int(at_least[b + 1]) if b + 1 < at_least.numel() else 0
    band = a[hi == b].numpy()
    kk = k - above
    return float(np.partition(band, band.size - kk)[band.size - kk])


def top_k_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries of largest |x| (0 <= k <= numel), the same entries as
    `torch.topk(t.abs().reshape(-1), k)`. When no entry ties with the k-th magnitude the set is
    {|x| >= k-th}, found by the radix select; otherwise topk chooses among the tied entries."""
    flat = t.detach().reshape(-1)
    if k <= 0:
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    a = flat.abs()
    if a.device.type != "cpu":  # on an accelerator topk is one fast kernel; the radix select is for CPUs
        mask = torch.zeros_like(a, dtype=torch.bool)
        mask[torch.topk(a, k, largest=True).indices] = True
        return mask.view(t.shape)
    mask = a >= torch.as_tensor(kth_largest_abs(a, k), dtype=a.dtype)
    if int(mask.sum()) != k:
        mask = torch.zeros_like(mask)
        mask[torch.topk(a, k, largest=True).indices] = True
    return mask.view(t.shape)


def trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (exactly
    int(density * numel) of them, as PEFT), zero the rest."""
    _check_density(density)
    if density >= 1:
        return t
    return t * top_k_mask(t, int(density * t.numel()))


def random_drop(t: torch.Tensor, density: float, rng: Rng, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale survivors by 1/density."""
    _check_density(density)
    if density >= 1:
        return t  # like PEFT: no draw at all
    if density == 0:
        raise RomscaleError("DARE needs density > 0 (it rescales the kept entries by 1/density)")
    if isinstance(rng, torch.Generator):
        # drawn on the CPU whatever the device: the generator is a CPU one (PEFT's stream)
        mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=rng).to(t.device)
    else:
        u = rng.integers(0, 65536, size=t.numel(), dtype=np.uint16)
        mask = torch.from_numpy(u < int(round(density * 65536))).reshape(t.shape).to(t.device, t.dtype)
    out = t * mask
    return out / density if rescale else out


_CHUNK_BYTES = 2 << 20  # elementwise work in slabs that stay in cache (measured best at 1-2 MiB)


def combine(
    kind: str,
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float = 1.0,
    sign_method: SignMethod = "total",
    rng: Rng | None = None,
) -> torch.Tensor:
    """Combine task tensors like PEFT's merge_utils: kind in linear | ties | dare_linear | dare_ties |
    magnitude_prune. Trimming and random drops happen task by task, each over the whole tensor, in
    task order (PEFT's draw order). A stacked (N, ...) float tensor passed in is modified in place."""
    if kind not in ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"):
        raise RomscaleError(f"unknown combination {kind!r}")
    if sign_method not in ("total", "frequency"):
        raise RomscaleError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    _check_density(density)
    X = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
    X = X.contiguous()
    N, shape = X.shape[0], X.shape[1:]
    Xf = X.view(N, -1)
    w = weights.to(X.device, X.dtype)
    if kind in ("ties", "magnitude_prune") and density < 1:
        k = int(density * Xf.shape[1])
        for t in range(N):
            Xf[t].mul_(top_k_mask(Xf[t], k))
    elif kind in ("dare_linear", "dare_ties") and density < 1:
        if rng is None:
            raise RomscaleError("DARE needs a random generator (seed)")
        for t in range(N):
            Xf[t] = random_drop(Xf[t].view(shape), density, rng).reshape(-1)
    if kind in ("linear", "magnitude_prune", "dare_linear"):
        return (w @ Xf).view(shape)
    # TIES: elect a sign per entry from the unweighted tensors (as PEFT), average the agreeing
    # weighted entries. With s = +-1 the elected sign, x agrees iff s*x > 0, and x*[agree] = s*relu(s*x).
    out = torch.empty(Xf.shape[1], dtype=X.dtype, device=X.device)
    step = max(1024, _CHUNK_BYTES // (N * X.element_size()))
    for s in range(0, Xf.shape[1], step):
        x = Xf[:, s : s + step]
        mag = x.sum(0) if sign_method == "total" else x.sign().sum(0)
        sgn = torch.where(mag >= 0, 1.0, -1.0).to(X.dtype)
        y = x * sgn
        count = (y > 0).sum(0, dtype=X.dtype).clamp_min(1.0)
        out[s : s + step] = sgn * (w @ y.relu_()) / count
    return out.view(shape)
