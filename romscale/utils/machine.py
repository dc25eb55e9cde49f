"""One line naming the machine a result came from (for results files and printed tables)."""

import os
import platform


def machine_line() -> str:
    import torch  # lazy: importing this module (the CLI does) must stay cheap

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()} {dev}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
