"""Adapter libraries under a storage budget: PEFT I/O, merges, HydraOpt."""
