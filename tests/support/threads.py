"""How many OpenMP/BLAS threads a test worker gets: its share of the cores (see conftest.py)."""
import os
from typing import Mapping, Optional


def worker_threads(environ: Mapping[str, str], cores: int) -> Optional[int]:
    """The thread count a pytest-xdist worker should set, or None: not a worker of several, or
    OMP_NUM_THREADS chosen already by whoever started the suite."""
    workers = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in environ:
        return None
    return max(1, cores // workers)


def share_the_cores_among_workers() -> None:
    """Set OMP_NUM_THREADS to this worker's share; it must run before numpy, MindSpore or the
    kernels' OpenMP are loaded, as each reads it once."""
    threads = worker_threads(os.environ, len(os.sched_getaffinity(0)))
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
