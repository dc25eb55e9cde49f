"""Where romscale keeps things it builds once per machine: the corpus, tokenizers, kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("ROMSCALE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "romscale"
    )
    return Path(root)
