"""Compiling the package's C/C++ sources once per machine into the cache folder's ``kernels/``.

A library is keyed by its source, the compiler's version and the flags, so a changed
source or compiler never reuses a stale build; concurrent processes build it once
(file lock) and a half-written library never carries the final name.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from . import env
from .fileio import atomic_output

__all__ = ["NativeBuildError", "default_build_dir", "library_file", "build", "retrieval_kernels"]

LOG = logging.getLogger(__name__)


class NativeBuildError(RuntimeError):
    """A library could not be built here (no compiler, compile error, unwritable folder)."""


def default_build_dir() -> Path:
    """``$VEHICLENET_KERNEL_CACHE``, else ``kernels/`` in the cache root (``$VEHICLENET_HOME``)."""
    return env.kernel_dir()


def library_file(
    source: Path,
    name: str,
    args: Sequence[str],
    *,
    compiler_env: str = "CXX",
    default_compiler: str = "c++",
    key_extra: Sequence[str] = (),
    build_dir: Optional[Path] = None,
) -> Tuple[str, Path]:
    """The compiler and the ``<build_dir>/<name>-<key>.so`` that :func:`build` makes (or made)
    for these inputs; nothing is compiled. Raises NativeBuildError without a compiler."""
    compiler = os.environ.get(compiler_env, default_compiler)
    if shutil.which(compiler) is None:
        kind = "C++" if compiler_env == "CXX" else "C"
        raise NativeBuildError(f"no {kind} compiler {compiler!r} on PATH (install gcc/g++ or set ${compiler_env})")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = source.read_text(encoding="utf-8")
    key = hashlib.sha256("\0".join([text, version, *args, *key_extra]).encode()).hexdigest()[:16]
    folder = Path(build_dir) if build_dir is not None else default_build_dir()
    return compiler, folder / f"{name}-{key}.so"


def build(source: Path, name: str, args: Sequence[str], **options: Any) -> Path:
    """Compile ``source`` with ``args`` into :func:`library_file`'s path unless it exists.

    ``args`` go after the source (include folders, libraries, flags); ``options`` are
    :func:`library_file`'s (``key_extra``: anything else the result depends on, e.g. a
    library's version).
    """
    compiler, target = library_file(source, name, args, **options)
    folder = target.parent
    if target.is_file():
        return target
    from filelock import FileLock

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if target.is_file():  # another process built it while we waited
                return target
            _compile(compiler, source, args, target)
    except OSError as err:
        raise NativeBuildError(f"cannot build {source.name} in {folder}: {err}") from err
    return target


def _compile(compiler: str, source: Path, args: Sequence[str], target: Path) -> None:
    with atomic_output(target) as partial:  # a half-written library never has the final name
        command = [compiler, str(source), *args, "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"compiling {source} failed ({' '.join(command)}):\n{done.stderr.strip()[-2000:]}")


@functools.lru_cache(maxsize=None)
def retrieval_kernels() -> Optional[ctypes.CDLL]:
    """``csrc/retrieval_kernels.c`` (re-ranking's Jaccard step, evaluation's hit positions),
    built once per machine with ``$CC`` or ``cc``; None (logged once) where it cannot be
    built: callers then run the numpy formulations, which give the same results, slower."""
    source = Path(__file__).with_name("csrc") / "retrieval_kernels.c"
    try:
        path = build(source, "retrieval_kernels", ["-O2", "-shared", "-fPIC", "-ffp-contract=off"],
                     compiler_env="CC", default_compiler="cc")
        return ctypes.CDLL(str(path))
    except (NativeBuildError, OSError) as err:
        LOG.info("retrieval kernels unavailable, evaluation and re-ranking run on numpy (slower): %s", err)
        return None
