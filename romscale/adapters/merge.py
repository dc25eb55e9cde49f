"""Merge methods: a registry (name -> class with one `merge_module` signature), mergekit-style.

Each method turns one module's N task factors into one (A, B) pair whose product is the merged
update (scaling 1); `merge_adapters` runs a method over every module and returns a standard PEFT
LoRA adapter. Two families, always named in results:

- "update": merges the updates dW_t = s_t B_t A_t (the sum of updates is exact by concatenation,
  `cat`; the others are truncated back to rank r with an SVD, like PEFT's *_svd types).
- "ab": merges the A matrices and the B matrices separately (PEFT's linear / ties / dare_* /
  magnitude_prune). Cheap and rank-preserving, but B_merged @ A_merged is not the merged update
  (cross terms); kept for parity with PEFT and the papers that use it.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from romscale.errors import AdapterError, RomscaleError
from romscale.adapters.bank import AdapterBank
from romscale.adapters.factors import ModuleStack, truncate_dense, truncate_factored
from romscale.adapters.ops import SignMethod, combine
from romscale.adapters.parallel import map_modules
from romscale.adapters.peft_io import LoraAdapter, adapter_from_factors
from romscale.adapters.storage import StorageReport, torch_dtype

Family = Literal["update", "ab"]


@dataclass(frozen=True)
class MergeOptions:
    """Options shared by all methods; each method reads the ones it needs."""

    weights: Sequence[float] | None = None  # None: the method's default (1/N for sums, 1 for TIES-like)
    density: float = 0.5  # fraction kept by trimming / DARE
    rank: int | None = None  # output rank of truncated update-space merges; None: max input rank per module
    seed: int = 0
    sign_method: SignMethod = "total"
    rng: Literal["fast", "torch"] = "fast"  # update-space DARE masks: fast numpy or PEFT's torch stream
    knots_inner: Literal["ties", "linear"] = "ties"  # how KnOTS merges the per-task coordinates
    dtype: str | None = None  # dtype of the merged factors; None: the inputs' dtype
    # Where the update-space arithmetic runs ("cuda", ...; None: the CPU). On a GPU host the merge,
    # not the loss, was 93% of D2C's time when it ran on the CPU (results/adapters_benchmark_gpu_partial).
    # The merged factors come back to the CPU; results agree with the CPU's to float rounding.
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = list(self.weights) if self.weights is not None else None
        return d


@dataclass
class MergeContext:
    """State handed to every module call. `torch_rng` is one stream consumed module by module in
    the bank's order (the model's order, as PEFT; merges run sequentially when they draw from it);
    `np_rng` is seeded per module from (seed, module index), so fast random merges can run in
    parallel and still give the same result."""

    options: MergeOptions
    torch_rng: torch.Generator
    np_rng: np.random.Generator
    _buffers: dict[tuple, torch.Tensor] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def create(cls, options: MergeOptions, torch_generator: torch.Generator) -> "MergeContext":
        return cls(options, torch_generator, np.random.default_rng([options.seed, 0]), device=merge_device(options))

    def for_module(self, index: int) -> "MergeContext":
        return MergeContext(self.options, self.torch_rng, np.random.default_rng([self.options.seed, index]), self._buffers,
                            self.device)

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor reused across modules of one shape, per thread: fresh allocations
        above glibc's mmap threshold page-fault on every call."""
        key = (threading.get_ident(), tuple(shape), dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self._buffers[key]


def merge_device(options: MergeOptions) -> torch.device:
    """The device of `options.device`, checked: an unavailable accelerator is an error, not a fallback."""
    if options.device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(options.device)
    except (RuntimeError, TypeError) as exc:
        raise RomscaleError(f"merge device must be a torch device name such as 'cpu' or 'cuda'; got {options.device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RomscaleError(f"merge device {options.device!r}: no CUDA device is available")
    return dev


class MergeMethod(ABC):
    name: ClassVar[str]
    family: ClassVar[Family]
    peft_name: ClassVar[str | None] = None  # PEFT add_weighted_adapter combination_type with the same result
    uses_density: ClassVar[bool] = False
    random: ClassVar[bool] = False
    default_weight: ClassVar[Literal["mean", "one"]] = "mean"
    description: ClassVar[str] = ""

    @abstractmethod
    def merge_module(self, stack: ModuleStack, weights: torch.Tensor, ctx: MergeContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (A (k x d_in), B (d_out x k)), float32, with B @ A the merged update."""

    def default_weights(self, n: int) -> list[float]:
        return [1.0 / n] * n if self.default_weight == "mean" else [1.0] * n


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in MERGE_METHODS:
        raise RomscaleError(f"merge method {cls.name!r} registered twice")
    MERGE_METHODS[cls.name] = cls()
    return cls


def get_merge_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise RomscaleError(f"unknown merge method {name!r}; available: {sorted(MERGE_METHODS)}") from None


def _out_rank(stack: ModuleStack, ctx: MergeContext) -> int:
    r = ctx.options.rank if ctx.options.rank is not None else max(stack.ranks)
    if r < 1:
        raise RomscaleError(f"output rank must be >= 1, got {r}")
    return min(r, stack.d_in, stack.d_out)


# ---- update-space family ----------------------------------------------------------------------
@register_merge_method
class Cat(MergeMethod):
    name = "cat"
    family = "update"
    peft_name = "cat"
    description = "exact weighted sum of updates by concatenation (rank = sum of ranks)"

    def merge_module(self, stack, weights, ctx):
        # Like PEFT: weight and scaling go on A; B is stacked as is.
        A = torch.cat([stack.A[t].float() * (float(weights[t]) * stack.scaling[t]) for t in range(stack.n)], dim=0)
        B = torch.cat([stack.B[t].float() for t in range(stack.n)], dim=1)
        return A, B


@register_merge_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    family = "update"
    peft_name = "svd"
    description = "weighted sum of updates, truncated to rank r by SVD (factored: R x R core when possible)"

    def merge_module(self, stack, weights, ctx):
        B = torch.cat([stack.B[t].float() * (float(weights[t]) * stack.scaling[t]) for t in range(stack.n)], dim=1)
        A = torch.cat([a.float() for a in stack.A], dim=0)
        Bn, An = truncate_factored(B, A, _out_rank(stack, ctx))
        return An, Bn


class _DenseUpdateMerge(MergeMethod):
    """Elementwise merges need the dense updates; the result is truncated back to rank r."""

    family = "update"
    uses_density = True
    kind: ClassVar[str]

    def merge_module(self, stack, weights, ctx):
        o = ctx.options
        rng = ctx.torch_rng if o.rng == "torch" else ctx.np_rng
        D = stack.deltas(torch.float32, out=ctx.buffer((stack.n, stack.d_out, stack.d_in), torch.float32))
        merged = combine(self.kind, D, weights, density=o.density, sign_method=o.sign_method, rng=rng)
        B, A = truncate_dense(merged, _out_rank(stack, ctx))
        return A, B


@register_merge_method
class Ties(_DenseUpdateMerge):
    name, kind, peft_name, default_weight = "ties", "ties", "ties_svd", "one"
    description = "TIES on the updates (trim to density, elect signs, disjoint mean), truncated to rank r"


@register_merge_method
class DareLinear(_DenseUpdateMerge):
    name, kind, peft_name, random = "dare_linear", "dare_linear", "dare_linear_svd", True
    description = "DARE on the updates (drop 1-density, rescale), weighted sum, truncated to rank r"


@register_merge_method
class DareTies(_DenseUpdateMerge):
    name, kind, peft_name, random, default_weight = "dare_ties", "dare_ties", "dare_ties_svd", True, "one"
    description = "DARE drop then TIES sign election on the updates, truncated to rank r"


@register_merge_method
class MagnitudePrune(_DenseUpdateMerge):
    name, kind, peft_name = "magnitude_prune", "magnitude_prune", "magnitude_prune_svd"
    description = "magnitude pruning of each update then weighted sum, truncated to rank r"


@register_merge_method
class Knots(MergeMethod):
    """KnOTS (Stoica et al. 2025), our reading: SVD of the side-by-side updates
    [dW_1 ... dW_N] = U S [V_1^T ... V_N^T]; merge the task coordinates V_t^T (TIES or weighted sum);
    rebuild U S V_merged^T and truncate to rank r. The SVD comes from a d_out- or R-sized Gram."""

    name = "knots"
    family = "update"
    uses_density = True
    default_weight = "one"
    description = "KnOTS: shared basis U S from the concatenated updates, task coordinates merged (TIES by default)"

    def merge_module(self, stack, weights, ctx):
        o = ctx.options
        A, B = stack.padded(torch.float64)  # B scaled; (N, r, d_in), (N, d_out, r)
        N, r, d_in = A.shape
        d_out = B.shape[1]
        Bcat = B.permute(1, 0, 2).reshape(d_out, N * r)  # [s_1 B_1, ..., s_N B_N]
        GA = A @ A.transpose(1, 2)  # blockdiag(A_t A_t^T)
        if d_out <= N * r:
            BG = torch.einsum("otj,tjk->otk", Bcat.view(d_out, N, r), GA).reshape(d_out, N * r)
            S2, U = torch.linalg.eigh(BG @ Bcat.T)
        else:
            Q, Rb = torch.linalg.qr(Bcat)
            blk = torch.block_diag(*GA)
            S2, Uq = torch.linalg.eigh(Rb @ blk @ Rb.T)
            U = Q @ Uq
        S2, U = S2.flip(0), U.flip(1)
        keep = S2 > S2[0].clamp_min(0) * 1e-12
        S = S2[keep].sqrt()
        U = U[:, keep]
        # V_t^T = S^-1 U^T dW_t = (S^-1 U^T s_t B_t) A_t, shape (k, d_in) per task; the small
        # factor in float64, the big product in float32 into a reused buffer.
        UB = (torch.einsum("ok,tor->tkr", U, B) / S.view(1, -1, 1)).float()
        Vt = torch.bmm(UB, A.float(), out=ctx.buffer((N, U.shape[1], d_in), torch.float32))
        inner = "ties" if o.knots_inner == "ties" else "linear"
        Vm = combine(inner, Vt, weights, density=o.density, sign_method=o.sign_method)
        Bn, An = truncate_factored((U * S).float(), Vm, _out_rank(stack, ctx))
        return An, Bn


# ---- A/B-separate family (PEFT's add_weighted_adapter without *_svd) --------------------------
class _ABMerge(MergeMethod):
    family = "ab"
    kind: ClassVar[str]

    def merge_module(self, stack, weights, ctx):
        if len(set(stack.ranks)) != 1:
            raise AdapterError(
                f"module {stack.name}: A/B-separate merges need one rank across adapters, got {sorted(set(stack.ranks))}; "
                f"use an update-space method (task_arithmetic, ties, ...)"
            )
        o = ctx.options
        # As PEFT: w*s split as sqrt on both sides, the sign on A only.
        ws = [float(weights[t]) * stack.scaling[t] for t in range(stack.n)]
        wa = torch.tensor([math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in ws])
        wb = torch.tensor([math.sqrt(abs(x)) for x in ws])
        kw = dict(density=o.density, sign_method=o.sign_method, rng=ctx.torch_rng)
        A = combine(self.kind, [a.float() for a in stack.A], wa, **kw)
        B = combine(self.kind, [b.float() for b in stack.B], wb, **kw)
        return A, B


@register_merge_method
class LinearAB(_ABMerge):
    name, kind, peft_name = "linear_ab", "linear", "linear"
    description = "PEFT 'linear': A and B averaged separately (not the sum of updates)"


@register_merge_method
class TiesAB(_ABMerge):
    name, kind, peft_name, uses_density, default_weight = "ties_ab", "ties", "ties", True, "one"
    description = "PEFT 'ties': TIES on A and on B separately"


@register_merge_method
class DareLinearAB(_ABMerge):
    name, kind, peft_name, uses_density, random = "dare_linear_ab", "dare_linear", "dare_linear", True, True
    description = "PEFT 'dare_linear': DARE on A and on B separately"


@register_merge_method
class DareTiesAB(_ABMerge):
    name, kind, peft_name, uses_density, random, default_weight = "dare_ties_ab", "dare_ties", "dare_ties", True, True, "one"
    description = "PEFT 'dare_ties': DARE + TIES on A and on B separately"


@register_merge_method
class MagnitudePruneAB(_ABMerge):
    name, kind, peft_name, uses_density = "magnitude_prune_ab", "magnitude_prune", "magnitude_prune", True
    description = "PEFT 'magnitude_prune': magnitude pruning on A and on B separately"


# ---- PEFT's random stream ------------------------------------------------------------------------
def _peft_rank(adapter: LoraAdapter) -> int:
    cfg = adapter.config
    return max([int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def peft_stream(bank: AdapterBank, method: MergeMethod, options: MergeOptions) -> torch.Generator:
    """A torch generator in the state PEFT's global RNG is in when `torch.manual_seed(seed);
    add_weighted_adapter(...)` starts combining: PEFT first creates the merged adapter's layers,
    module by module in model order (nn.Linear init of lora_A and lora_B, then the LoRA init of
    lora_A), drawing from the same stream. Replayed draw for draw (tested against peft 0.21)."""
    g = torch.Generator().manual_seed(options.seed)
    ranks = [_peft_rank(a) for a in bank.adapters]
    rank = ranks[0] if method.family == "ab" else (options.rank or max(ranks))
    init = bank.adapters[0].config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise AdapterError(f"cannot replay PEFT's random stream for init_lora_weights={init!r} (True, False or 'gaussian' only); use --rng fast")
    for mod in bank.modules:
        d_out, d_in = bank.shapes[mod]
        torch.empty(rank, d_in).uniform_(generator=g)  # nn.Linear(d_in, r).reset_parameters()
        torch.empty(d_out, rank).uniform_(generator=g)  # nn.Linear(r, d_out).reset_parameters()
        if init is True:
            torch.empty(rank, d_in).uniform_(generator=g)  # kaiming_uniform_(lora_A)
        elif init == "gaussian":
            torch.empty(rank, d_in).normal_(generator=g)
    return g


# ---- driver -------------------------------------------------------------------------------------
@dataclass
class MergeResult:
    method: str
    family: Family
    adapter: LoraAdapter
    options: MergeOptions
    weights: list[float]
    seconds: float
    module_order: list[str] = field(default_factory=list)  # the order random draws were made in
    storage: StorageReport = field(init=False)

    def __post_init__(self) -> None:
        self.storage = StorageReport.from_tensors((m, t) for m, lm in self.adapter.modules.items() for t in (lm.A, lm.B))

    def summary(self, library: StorageReport | None = None) -> dict[str, Any]:
        out = {
            "method": self.method,
            "family": self.family,
            "peft_equivalent": get_merge_method(self.method).peft_name,
            "weights": self.weights,
            "options": self.options.to_dict(),
            "seconds": round(self.seconds, 4),
            "module_order": self.module_order,
            "storage": self.storage.to_dict(per_module=False),
        }
        if library is not None:
            out["library_storage"] = library.to_dict(per_module=False)
            out["storage_fraction_params"] = self.storage.params / library.params
            out["storage_fraction_bytes"] = self.storage.bytes / library.bytes
        return out


def resolve_weights(method: MergeMethod, n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return method.default_weights(n)
    w = [float(x) for x in weights]
    if len(w) != n:
        raise RomscaleError(f"got {len(w)} weights for {n} adapters")
    if not all(np.isfinite(w)):
        raise RomscaleError(f"weights must be finite, got {w}")
    return w


def _ties_batched(bank: AdapterBank, wt: torch.Tensor, ctx: MergeContext, out_dtype: torch.dtype) -> dict[str, tuple]:
    """TIES on an accelerator: the modules of one shape in one batch (romscale.adapters.batched)."""
    from romscale.adapters.batched import ties_group

    o = ctx.options
    groups: dict[tuple, list[tuple[str, ModuleStack]]] = {}
    for mod in bank.modules:
        st = bank.stack(mod).to(ctx.device)
        groups.setdefault((st.d_out, st.d_in, tuple(st.ranks)), []).append((mod, st))
    factors: dict[str, tuple] = {}
    for group in groups.values():
        mods, stacks = zip(*group)
        rank = _out_rank(stacks[0], ctx)
        for mod, (A, B) in zip(mods, ties_group(stacks, wt, density=o.density, sign_method=o.sign_method, rank=rank)):
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise RomscaleError(f"merge ties produced NaN/Inf in module {mod}")
            factors[mod] = (A.to("cpu", out_dtype).contiguous(), B.to("cpu", out_dtype).contiguous())
    return {mod: factors[mod] for mod in bank.modules}


def merge_adapters(
    bank: AdapterBank,
    method: str,
    options: MergeOptions | None = None,
    *,
    name: str | None = None,
    progress: bool = False,
    torch_generator: torch.Generator | None = None,
    workers: int | None = None,
) -> MergeResult:
    """Merge every adapter of `bank` into one LoRA adapter with `method` (see MERGE_METHODS).

    Random methods draw module by module in the bank's (the model's) order: from PEFT's stream
    (`peft_stream`: the same masks as `torch.manual_seed(seed); add_weighted_adapter(...)`) for the
    A/B family and rng="torch", or from numpy streams seeded per module for rng="fast";
    `torch_generator` replaces PEFT's stream (its state when PEFT starts combining). The merged
    factors are stored in `options.dtype`, by default the inputs' dtype."""
    options = options or MergeOptions()
    m = get_merge_method(method)
    if m.uses_density and not 0.0 < options.density <= 1.0:
        raise RomscaleError(f"density must be in (0, 1], got {options.density}")
    out_dtype = torch_dtype(options.dtype, "dtype") if options.dtype is not None else bank.dtype
    w = resolve_weights(m, bank.n, options.weights)
    wt = torch.tensor(w, dtype=torch.float32)
    # Draws from the single torch stream must happen in module order: run those sequentially.
    sequential = m.random and (m.family == "ab" or options.rng == "torch")
    if torch_generator is None:
        torch_generator = peft_stream(bank, m, options) if sequential else torch.Generator().manual_seed(options.seed)
    ctx = MergeContext.create(options, torch_generator)
    start = time.perf_counter()

    on_cpu = ctx.device.type == "cpu"

    def one(i: int, mod: str) -> tuple[torch.Tensor, torch.Tensor]:
        stack = bank.stack(mod)
        A, B = m.merge_module(stack if on_cpu else stack.to(ctx.device), wt.to(ctx.device), ctx.for_module(i))
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise RomscaleError(f"merge {method} produced NaN/Inf in module {mod}")
        return A.to("cpu", out_dtype).contiguous(), B.to("cpu", out_dtype).contiguous()

    if not on_cpu and m.name == "ties":
        factors = _ties_batched(bank, wt, ctx, out_dtype)
    else:
        # On an accelerator the modules run one after another: its own parallelism is inside each op.
        results = map_modules(one, bank.modules, workers=1 if sequential or not on_cpu else workers, desc=f"merge {method}",
                              progress=progress)
        factors = dict(zip(bank.modules, results))
    adapter = adapter_from_factors(name or f"merge-{method}", bank.template_config(), factors)
    return MergeResult(method, m.family, adapter, options, w, time.perf_counter() - start, list(bank.modules))
