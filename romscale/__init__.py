"""romscale: trade flash storage ("ROM") for on-device LLM quality.

Two halves: MeKi memory experts (`romscale.meki`) and adapter libraries under a storage budget
(`romscale.adapters`).
"""

__version__ = "0.1.0"
