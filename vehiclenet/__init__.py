"""VehicleNet vehicle re-identification for MindSpore.

Importing the package is cheap: MindSpore is imported only by the functions that
build or run a network, so ``vehiclenet verify`` / ``download`` / ``evaluate
--features`` start fast.
"""
import os
from typing import Any

# The oneDNN CPU kernels (cpu_kernels.py) run on GNU OpenMP, whose threads by default spin for
# ~300k iterations after every parallel region. On a small CPU that spinning steals the cores
# from the MindSpore operators that run in between: training was 6 % slower. libgomp reads
# this once, when it is loaded, so it is set here, before mindspore.dataset or the kernels
# load it; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "1.0.0"

__all__ = ["__version__", "create_network"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: keeps `import vehiclenet` free of mindspore.
    if name == "create_network":
        from .model import create_network

        return create_network
    raise AttributeError(f"module 'vehiclenet' has no attribute {name!r}")
