"""Page-cache helpers for honest flash measurements (Linux): drop a file's cached pages, and count
how many of a mapping's pages are resident (mincore(2), which Python does not wrap)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE


def drop_file_cache(path: str | Path) -> None:
    """Ask the kernel to evict the file's clean pages (POSIX_FADV_DONTNEED; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(mapping: mmap.mmap) -> int:
    """Bytes of `mapping` resident in memory, from mincore(2)."""
    import numpy as np

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    length = len(mapping)
    n_pages = (length + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n_pages)()
    # The address of a read-only mmap: numpy exposes it without copying.
    addr = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore failed: {os.strerror(err)}")
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * PAGE


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status: VmRSS (all of it), RssAnon (heap and
    other anonymous memory) or RssFile (mapped files: libraries, mmap-loaded weights, the ROM table)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not found in /proc/self/status")


def rss_anon_bytes() -> int:
    return rss_bytes("RssAnon")


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), e.g. the scratch of model loading.

    glibc raises its mmap threshold after large frees, so load-time copies can stay in the heap and
    count as resident memory though nothing uses them. No-op where malloc_trim does not exist.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    # find_library runs ldconfig (or a compiler) in a subprocess: resolve once, not on every call.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError):
        return None
