"""TIES merges of many member sets from per-task sums: the merge inside D2C's loop.

D2C merges cluster after cluster, each differing from an earlier one by one task. After the
per-task trim, TIES is additive: for the trimmed updates x_t of a member set, the elected sign
needs only sum_t x_t (sign_method "total") or the counts of positive and negative entries
("frequency"), and the disjoint mean on either side needs sum_t w_t relu(+-x_t) and that side's
count. So each task's trimmed update is computed once (the dense update and its top-k trim are
most of a merge's time), the sums of recent sets are kept (LRU), and a set one task larger than a
kept one is one add away. Per merge only the sign pick, the division and the rank-r truncation run.

The result equals `merge_adapters(..., "ties")` up to float summation order (tested); the plain
path (romscale.adapters.merge) stays the reference and serves every other method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from romscale.adapters.bank import AdapterBank
from romscale.adapters.factors import truncate_dense
from romscale.adapters.ops import top_k_mask
from romscale.adapters.parallel import map_modules
from romscale.adapters.peft_io import LoraAdapter, adapter_from_factors
from romscale.adapters.storage import torch_dtype
from romscale.errors import RomscaleError


@dataclass
class _Sums:
    """Per module, flattened: sum_t w_t relu(x_t), sum_t w_t relu(-x_t), the counts of positive and
    negative entries, and sum_t x_t (unweighted, as PEFT elects; None for sign_method frequency)."""

    pos: dict[str, torch.Tensor]
    neg: dict[str, torch.Tensor]
    npos: dict[str, torch.Tensor]
    nneg: dict[str, torch.Tensor]
    mag: dict[str, torch.Tensor] | None


def bytes_needed(bank: AdapterBank, cache_size: int) -> int:
    """Memory IncrementalTies holds at most: a float32 trimmed update per task and 16 bytes per
    adapted weight entry for each kept member set."""
    entries = sum(d_out * d_in for d_out, d_in in bank.shapes.values())
    return entries * (4 * bank.n + 16 * cache_size)


def available_bytes(device: torch.device) -> int:
    """Free memory where the sums would live: the accelerator's free memory, or the host's
    MemAvailable (Linux; elsewhere 0, so the plain merge is used)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class IncrementalTies:
    """merge(members) -> TIES-merged LoraAdapter of those tasks of `bank`, from cached sums.

    `options`: a romscale.adapters.merge.MergeOptions (density, sign_method, rank, dtype, device);
    per-task weights are TIES's default, one per member. `cache_size`: member sets whose sums are
    kept (each holds 16 bytes per adapted weight entry)."""

    def __init__(self, bank: AdapterBank, options, cache_size: int = 8) -> None:
        from romscale.adapters.merge import merge_device

        if options.weights is not None:
            raise RomscaleError("incremental TIES merges with TIES's default weights (one per task); weights were given")
        if not 0.0 < options.density <= 1.0:
            raise RomscaleError(f"density must be in (0, 1], got {options.density}")
        if cache_size < 1:
            raise RomscaleError(f"cache_size must be >= 1, got {cache_size}")
        self.bank, self.options, self.cache_size = bank, options, cache_size
        self.device = merge_device(options)
        self._trimmed: dict[int, dict[str, torch.Tensor]] = {}
        self._sums: OrderedDict[frozenset[int], _Sums] = OrderedDict()
        self.stats = {"tasks_trimmed": 0, "sums_from_scratch": 0, "sums_extended": 0, "sums_reused": 0}

    # -- per task -----------------------------------------------------------------------------------
    def trimmed(self, i: int) -> dict[str, torch.Tensor]:
        """Task i's dense updates, trimmed to the density, flattened per module (computed once)."""
        if i not in self._trimmed:
            def one(_: int, mod: str) -> torch.Tensor:
                lm = self.bank.adapters[i].modules[mod]
                A, B = lm.A.to(self.device, torch.float32), lm.B.to(self.device, torch.float32)
                x = (B @ A).mul_(lm.scaling).reshape(-1)  # the same product as ModuleStack.deltas
                if self.options.density < 1:
                    x.mul_(top_k_mask(x, int(self.options.density * x.numel())))
                return x

            mods = self.bank.modules
            self._trimmed[i] = dict(zip(mods, map_modules(one, mods, workers=None if self.device.type == "cpu" else 1)))
            self.stats["tasks_trimmed"] += 1
        return self._trimmed[i]

    # -- per member set -------------------------------------------------------------------------------
    def _add(self, s: _Sums | None, i: int) -> _Sums:
        """s plus task i (s None: task i alone); s itself is left unchanged."""
        x = self.trimmed(i)
        frequency = self.options.sign_method == "frequency"
        if s is None:
            return _Sums({m: v.clamp_min(0) for m, v in x.items()}, {m: (-v).clamp_min(0) for m, v in x.items()},
                         {m: (v > 0).to(torch.int16) for m, v in x.items()}, {m: (v < 0).to(torch.int16) for m, v in x.items()},
                         None if frequency else {m: v.clone() for m, v in x.items()})
        return _Sums({m: s.pos[m] + x[m].clamp_min(0) for m in x}, {m: s.neg[m] - x[m].clamp_max(0) for m in x},
                     {m: s.npos[m] + (x[m] > 0) for m in x}, {m: s.nneg[m] + (x[m] < 0) for m in x},
                     None if frequency else {m: s.mag[m] + x[m] for m in x})

    def sums(self, members: frozenset[int]) -> _Sums:
        if members in self._sums:
            self._sums.move_to_end(members)
            self.stats["sums_reused"] += 1
            return self._sums[members]
        base = next((members - {i} for i in sorted(members) if members - {i} in self._sums), None)
        if base is not None:
            (extra,) = members - base
            s = self._add(self._sums[base], extra)
            self.stats["sums_extended"] += 1
        else:
            s = None
            for i in sorted(members):  # the plain merge's order
                s = self._add(s, i)
            self.stats["sums_from_scratch"] += 1
        self._sums[members] = s
        if len(self._sums) > self.cache_size:
            self._sums.popitem(last=False)
        return s

    def _merged_dense(self, s: _Sums, mod: str) -> torch.Tensor:
        """The TIES update of module `mod`, flattened: the elected side's sum over its count."""
        mag = s.npos[mod] - s.nneg[mod] if s.mag is None else s.mag[mod]
        up = mag >= 0
        return torch.where(up, s.pos[mod] / s.npos[mod].clamp_min(1), -s.neg[mod] / s.nneg[mod].clamp_min(1))

    def merge(self, members: Sequence[str]) -> LoraAdapter:
        from romscale.adapters.batched import truncate_group

        idx = sorted({self.bank.index(t) for t in members})
        if not idx:
            raise RomscaleError("cannot merge an empty cluster")
        s = self.sums(frozenset(idx))
        sub = AdapterBank([self.bank.adapters[i] for i in idx], allow_base_mismatch=True, module_order=self.bank.modules)
        out_dtype = torch_dtype(self.options.dtype, "dtype") if self.options.dtype is not None else sub.dtype
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        groups: dict[tuple[int, int, int], list[str]] = {}
        for mod in self.bank.modules:
            d_out, d_in = self.bank.shapes[mod]
            r = self.options.rank if self.options.rank is not None else max(sub.ranks(mod))
            r = min(r, d_out, d_in)
            groups.setdefault((d_out, d_in, r), []).append(mod)
        for (d_out, d_in, r), mods in groups.items():
            if self.device.type == "cpu":  # module by module on 1-thread workers, as the plain CPU merge
                pairs = map_modules(lambda _, m: truncate_dense(self._merged_dense(s, m).view(d_out, d_in), r)[::-1], mods)
            else:  # one batched eigh per shape, as the plain accelerator merge (romscale.adapters.batched)
                pairs = truncate_group(torch.stack([self._merged_dense(s, m).view(d_out, d_in) for m in mods]), r)
            for mod, (A, B) in zip(mods, pairs):
                if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                    raise RomscaleError(f"merge ties produced NaN/Inf in module {mod}")
                factors[mod] = (A.to("cpu", out_dtype).contiguous(), B.to("cpu", out_dtype).contiguous())
        name = "+".join(self.bank.names[i] for i in idx)
        return adapter_from_factors(name, sub.template_config(), {m: factors[m] for m in self.bank.modules})
