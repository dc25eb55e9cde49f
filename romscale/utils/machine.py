"""One line naming the machine a result came from (for results files and printed tables)."""

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere): two machines of one
    'kind' may differ (an AMD EPYC and an Intel Xeon ran this project's CPU sessions), and figures
    are only comparable on the same CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import torch  # lazy: importing this module (the CLI does) must stay cheap

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.machine()} {dev} ({cpu_model()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast is likely to pay on `device_type`: always on an accelerator; on a CPU
    only with native bf16 matrix instructions (AVX512-BF16 or AMX). Without them autocast emulates
    bf16: a LoRA step ran 2.8x slower than in fp32 on an Intel Xeon without AVX512-BF16 (a hand
    check, session 6)."""
    if device_type != "cpu":
        return True
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(p is not None and bool(p()) for p in probes)
