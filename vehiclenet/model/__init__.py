"""The network: its cells, the backends its layers run on (MindSpore's operators or the oneDNN
kernels), device choice, checkpoints, compiled-graph caching, export, and
:func:`~vehiclenet.model.factory.create_network`, which builds it from verified weights."""
from typing import Any

__all__ = ["create_network"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a module of this package must not import MindSpore through the factory.
    if name == "create_network":
        from .factory import create_network

        return create_network
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
