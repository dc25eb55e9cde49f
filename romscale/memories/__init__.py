"""Storage-based memories behind one protocol (docs/memories.md): MeKi, PLE, Engram and the
fat-embedding control. Entry point: `romscale.memories.base.get_memory(name)`; ROM budgets:
`romscale.memories.budget`. Nothing is imported here (romscale.meki imports the base module)."""
