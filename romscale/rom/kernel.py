"""Build (once per machine) and load the C kernel for the middle of a fused decode-time FFN layer.

Why a hand-built kernel: see kernels/ffn_mid.c. torch.compile (Inductor) would need the same
compiler plus a compile step per model and shape; this needs `cc` and under a second, once per machine.

If no compiler is found, or ROMSCALE_NO_KERNEL=1, `ffn_kernel()` returns None and the fused module
runs the same algebra in eager PyTorch (tests check both give the same numbers).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from romscale.utils.cache import cache_dir

SOURCE = Path(__file__).with_name("kernels") / "ffn_mid.c"
FLAGS = ["-O3", "-ffast-math", "-march=native", "-shared", "-fPIC"]
FUSION_CODES = {"add_sigmoid": 0, "mul_sigmoid": 1, "add_silu": 2, "mul_silu": 3}


class FfnParams(ctypes.Structure):
    """Mirrors romscale_ffn_params in kernels/ffn_mid.c."""

    _fields_ = [
        ("ffn", ctypes.c_int64),
        ("d_mem", ctypes.c_int64),
        ("d_model", ctypes.c_int64),
        ("o_stride", ctypes.c_int64),
        ("e_stride", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("fusion", ctypes.c_int32),
    ]


FfnKernel = Callable[..., None]  # (params*, o, e, w_out, w_post, h_out, y_out, n): see kernels/ffn_mid.c
MAX_D_MEM = 8192  # the kernel keeps v on the stack


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: a concurrent or interrupted build never leaves half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def ffn_kernel() -> FfnKernel | None:
    """The compiled `romscale_ffn_mid`, or None where it cannot be built here."""
    if os.environ.get("ROMSCALE_NO_KERNEL") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    # -march=native: key the library by the CPU's feature flags too, so a cache folder shared between
    # machines never hands one a library with instructions it lacks.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    lib_path = cache_dir() / "kernels" / f"ffn_mid-{key}.so"
    try:
        if not lib_path.exists():
            _build(compiler, lib_path)
        fn = ctypes.CDLL(str(lib_path)).romscale_ffn_mid
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"romscale: could not build the fused FFN kernel with {compiler} ({detail}); using eager PyTorch")
        return None
    ptr = ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int64]
    fn.restype = None
    return fn
