"""A ROM budget sizes every memory, so `--rom-params N` gives arms that spend the same storage.

Each memory sizes one width (MeKi d_mem, PLE d_ple, Engram rows_per_head, fat extra) and keeps the
rest of its config; integer widths and prime table sizes make the match approximate: `matched_arms`
reports each arm's relative error, and tests/memories/test_budget.py holds it within a few percent.
"""

from __future__ import annotations

from typing import Any

from romscale.errors import RomscaleError
from romscale.memories.base import MemoryConfig, get_memory


def size_for_budget(name: str, rom_params: int, model_config: Any, base: MemoryConfig | None = None) -> MemoryConfig:
    """The config of memory `name` (from `base`'s other fields) whose ROM is closest to `rom_params`."""
    if not isinstance(rom_params, int) or isinstance(rom_params, bool) or rom_params <= 0:
        raise RomscaleError(f"the ROM budget must be a positive number of parameters, got {rom_params!r}")
    return get_memory(name).size_for_budget(rom_params, model_config, base)


def matched_arms(names: list[str], rom_params: int, model_config: Any, bases: dict[str, MemoryConfig] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"config": cfg, "rom_params": n, "rel_error": (n - budget) / budget}} for each arm."""
    out = {}
    for name in names:
        cfg = size_for_budget(name, rom_params, model_config, (bases or {}).get(name))
        n = get_memory(name).rom_params(cfg, model_config)
        out[name] = {"config": cfg, "rom_params": n, "rel_error": (n - rom_params) / rom_params}
    return out
