"""Incremental TIES (romscale/adapters/ties_sums.py): the same merge as the plain path, whether a
member set's sums come from scratch, from a kept set one task smaller, or from the cache."""

from __future__ import annotations

import pytest
import torch

from romscale.adapters.bank import AdapterBank
from romscale.adapters.clusterers import cluster_merger
from romscale.adapters.merge import MergeOptions, merge_adapters
from romscale.adapters.peft_io import LoraAdapter, LoraModule
from romscale.adapters.ties_sums import IncrementalTies, bytes_needed
from romscale.errors import RomscaleError

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 12), "model.layers.0.self_attn.k_proj": (4, 12),
          "model.layers.1.self_attn.q_proj": (12, 12), "model.layers.1.mlp.down_proj": (12, 30)}


def _library(n: int = 6, rank: int = 3, seed: int = 0) -> AdapterBank:
    g = torch.Generator().manual_seed(seed)
    ads = []
    for t in range(n):
        mods = {m: LoraModule(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), alpha=2.0 * rank)
                for m, (d_out, d_in) in SHAPES.items()}
        ads.append(LoraAdapter(f"t{t}", {"base_model_name_or_path": "synthetic", "r": rank}, mods))
    return AdapterBank(ads)


def _plain(lib: AdapterBank, members, options: MergeOptions) -> LoraAdapter:
    sub = AdapterBank([lib.adapters[lib.index(t)] for t in sorted(members, key=lib.index)], allow_base_mismatch=True,
                      module_order=lib.modules)
    return merge_adapters(sub, "ties", options).adapter


def _close(a: LoraAdapter, b: LoraAdapter) -> None:
    assert list(a.modules) == list(b.modules)
    for m in a.modules:
        da, db = a.modules[m].B @ a.modules[m].A, b.modules[m].B @ b.modules[m].A
        assert a.modules[m].A.shape == b.modules[m].A.shape
        torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-5 * float(db.abs().max()))


@pytest.mark.parametrize("density,sign_method", [(0.5, "total"), (1.0, "total"), (0.3, "frequency")])
def test_incremental_equals_plain_from_scratch_extended_and_cached(density, sign_method):
    lib = _library()
    opts = MergeOptions(density=density, sign_method=sign_method)
    inc = IncrementalTies(lib, opts, cache_size=4)
    for members in (["t0", "t2", "t3"], ["t0", "t2", "t3", "t5"], ["t2", "t3"], ["t0", "t2", "t3", "t5"], ["t1", "t4"]):
        _close(inc.merge(members), _plain(lib, members, opts))
    assert inc.stats["sums_extended"] >= 1 and inc.stats["sums_reused"] >= 1 and inc.stats["sums_from_scratch"] >= 2
    assert inc.stats["tasks_trimmed"] == 6  # every task trimmed once, however many sets it joined


def test_incremental_rank_dtype_and_eviction():
    lib = _library(n=5, rank=4)
    opts = MergeOptions(density=0.6, rank=2, dtype="float16")
    inc = IncrementalTies(lib, opts, cache_size=1)
    a = inc.merge(["t4", "t1"])
    assert all(m.A.shape[0] == 2 and m.A.dtype == torch.float16 for m in a.modules.values())
    _close(inc.merge(["t1", "t4"]), _plain(lib, ["t1", "t4"], opts))
    inc.merge(["t0", "t3"])  # evicts {t1, t4}: its next merge starts from scratch, same result
    before = inc.stats["sums_from_scratch"]
    _close(inc.merge(["t1", "t4"]), _plain(lib, ["t1", "t4"], opts))
    assert inc.stats["sums_from_scratch"] == before + 1


def test_cluster_merger_incremental_matches_plain_and_keeps_singletons():
    lib = _library()
    fast, plain = cluster_merger(lib, "ties"), cluster_merger(lib, "ties", incremental=False)
    _close(fast(("t3", "t1", "t0")), plain(("t0", "t1", "t3")))
    assert fast(("t2",)) is lib.adapters[2]  # a one-task cluster keeps its adapter


def test_incremental_refuses_what_it_cannot_do():
    lib = _library(n=3)
    with pytest.raises(RomscaleError, match="weights"):
        IncrementalTies(lib, MergeOptions(weights=[1.0, 1.0, 1.0]))
    with pytest.raises(RomscaleError, match="density"):
        IncrementalTies(lib, MergeOptions(density=0.0))
    with pytest.raises(RomscaleError, match="cache_size"):
        IncrementalTies(lib, MergeOptions(), cache_size=0)
    with pytest.raises(RomscaleError, match="empty"):
        IncrementalTies(lib, MergeOptions()).merge([])
    entries = sum(a * b for a, b in SHAPES.values())
    assert bytes_needed(lib, cache_size=2) == entries * (4 * 3 + 16 * 2)
