"""VehicleNet vehicle re-identification for MindSpore.

Importing the package is cheap: MindSpore is imported only by the functions that
build or run a network, so ``vehiclenet verify`` / ``download`` / ``evaluate
--features`` start fast.
"""
from typing import Any

__version__ = "1.0.0"

__all__ = ["__version__", "create_network"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: keeps `import vehiclenet` free of mindspore.
    if name == "create_network":
        from .model import create_network

        return create_network
    raise AttributeError(f"module 'vehiclenet' has no attribute {name!r}")
