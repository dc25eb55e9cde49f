"""Scoring adapters on tasks: metrics (metrics.py) and, from other modules, prompting and evaluation."""
