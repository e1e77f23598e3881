"""VehicleNet vehicle re-identification for MindSpore.

Importing the package is cheap: MindSpore is imported only by the functions that
build or run a network, so ``vehiclenet verify`` / ``download`` / ``evaluate
--features`` start fast.
"""
import os
from typing import Any


def _shorten_openmp_spinning() -> bool:
    """Default ``GOMP_SPINCOUNT`` to 10000; False when that cannot take effect.

    The oneDNN CPU kernels (model/cpu_kernels.py) run on GNU OpenMP, whose threads by default spin
    for ~300k iterations after every parallel region. On a small CPU that spinning takes the
    cores from the MindSpore operators that run in between, and MindSpore's own worker
    thread then waits out scheduler slices: training was ~8 % slower. libgomp reads this once,
    when it is loaded, so it only takes effect if nothing (``import mindspore`` does) loaded
    libgomp before ``import vehiclenet``. A spin count or wait policy the user set wins.
    """
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return True
    os.environ["GOMP_SPINCOUNT"] = "10000"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "/libgomp" not in maps.read()
    except OSError:  # no /proc: not Linux, where the kernels do not run either
        return True


OPENMP_SPIN_SHORTENED = _shorten_openmp_spinning()

# The one place the version is written: pyproject.toml reads it (without importing the package),
# `vehiclenet --version` and `vehiclenet info` print it.
__version__ = "1.0.0"

__all__ = ["__version__", "create_network", "same_vehicle"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attributes: keep `import vehiclenet` free of mindspore and numpy.
    if name == "create_network":
        from .model.factory import create_network

        return create_network
    if name == "same_vehicle":
        from .retrieval.calibration import same_vehicle

        return same_vehicle
    raise AttributeError(f"module 'vehiclenet' has no attribute {name!r}")
