"""Compiling the package's C/C++ sources once per machine into the cache folder's ``kernels/``,
and loading them only from where nobody else can have put them.

A library is keyed by its source, the compiler's version and the flags, so a changed
source or compiler never reuses a stale build; concurrent processes build it once
(file lock) and a half-written library never carries the final name. The process that
compiles a library records its sha256 beside it (``<file>.sha256``); before every load the
folder and the file must pass :mod:`vehiclenet.cache_trust`'s ownership rule and the bytes
must match that record. A folder that fails the rule is refused (one warning) and the
library is built in the user's own cache folder instead; a library that does not match its
record is compiled again, never loaded.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from . import cache_trust, env
from .fileio import atomic_output, file_lock, sha256_file

__all__ = ["NativeBuildError", "default_build_dir", "library_file", "build", "find_built", "load",
           "retrieval_kernels", "RETRIEVAL_SYMBOLS"]

LOG = logging.getLogger(__name__)

WHAT = "compiled kernels"
HINT = f"point {env.KERNEL_CACHE} (or {env.HOME}) at a folder only you can write"
RETRIEVAL_SOURCE = Path(__file__).with_name("csrc") / "retrieval_kernels.c"
RETRIEVAL_FLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off")
# Every function of csrc/retrieval_kernels.c the package calls (a test checks the list).
RETRIEVAL_SYMBOLS = ("VnJaccardRows", "VnNormalisedRows", "VnTopK", "VnHitPositionsF32", "VnHitPositionsF64")


class NativeBuildError(RuntimeError):
    """A library could not be built or loaded here (no compiler, compile error, no usable
    folder, a library that fails to load or lacks a function)."""


def _candidates(build_dir: Optional[Path]) -> List[cache_trust.Candidate]:
    """Where the library may live, in order: an explicit ``build_dir`` alone; else the
    configured kernel folder, then ``kernels/`` of the user's own cache folder."""
    if build_dir is not None:
        return [(Path(build_dir), Path(build_dir))]
    user = env.user_cache_dir()
    found = [(env.kernel_dir(), env.kernel_root()), (user / env.KERNEL_FOLDER, user)]
    return [c for i, c in enumerate(found) if c[0] not in [f for f, _ in found[:i]]]


def default_build_dir() -> Path:
    """Where libraries are built: ``$VEHICLENET_KERNEL_CACHE``, else ``kernels/`` in the cache
    root (``$VEHICLENET_HOME``); the user's own ``kernels/`` when that folder fails the rule."""
    candidates = _candidates(None)
    folder, _ = cache_trust.first_trusted(candidates, WHAT, "the kernels are not used", create=False, hint=HINT)
    return folder if folder is not None else candidates[0][0]


def _compiler(compiler_env: str, default_compiler: str) -> str:
    compiler = os.environ.get(compiler_env, default_compiler)
    if shutil.which(compiler) is None:
        kind = "C++" if compiler_env == "CXX" else "C"
        raise NativeBuildError(f"no {kind} compiler {compiler!r} on PATH (install gcc/g++ or set ${compiler_env})")
    return compiler


def _file_name(compiler: str, source: Path, name: str, args: Sequence[str], key_extra: Sequence[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = source.read_text(encoding="utf-8")
    key = hashlib.sha256("\0".join([text, version, *args, *key_extra]).encode()).hexdigest()[:16]
    return f"{name}-{key}.so"


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
    compiler = _compiler(compiler_env, default_compiler)
    folder = Path(build_dir) if build_dir is not None else default_build_dir()
    return compiler, folder / _file_name(compiler, source, name, args, key_extra)


def build(source: Path, name: str, args: Sequence[str], *, compiler_env: str = "CXX",
          default_compiler: str = "c++", key_extra: Sequence[str] = (), build_dir: Optional[Path] = None) -> Path:
    """Compile ``source`` with ``args`` unless a library matching its recorded sha256 is there;
    return its path, in the first folder that passes the ownership rule and can hold it.

    ``args`` go after the source (include folders, libraries, flags); ``key_extra``: anything
    else the result depends on (e.g. a library's version). ``build_dir`` overrides the
    kernel folder (and its fallback).
    """
    compiler = _compiler(compiler_env, default_compiler)
    file_name = _file_name(compiler, source, name, args, key_extra)
    problems = []
    for folder in _trusted_folders(build_dir, create=True):
        try:
            return _build_in(folder / file_name, compiler, source, args)
        except OSError as err:  # e.g. a read-only shared cache without this library: the next folder
            problems.append(f"cannot build {source.name} in {folder}: {err}")
            LOG.info("%s", problems[-1])
    raise NativeBuildError("; ".join(problems) or f"no folder to build {source.name} in passes the ownership rule")


def _trusted_folders(build_dir: Optional[Path], create: bool) -> Iterator[Path]:
    """The candidate folders (:func:`_candidates`) that pass the ownership rule, in order,
    resolved (created 0700 with ``create``); refused ones are named in one warning each."""
    candidates = _candidates(build_dir)
    while candidates:
        folder, index = cache_trust.first_trusted(candidates, WHAT, "the kernels are not used", create=create,
                                                  hint=HINT)
        if folder is None:
            return
        yield folder
        candidates = candidates[index + 1:]


def _build_in(target: Path, compiler: str, source: Path, args: Sequence[str]) -> Path:
    if _usable(target):
        return target
    with file_lock(target.with_name(target.name + ".lock"), env.lock_timeout()):
        if _usable(target):  # another process built it while we waited
            return target
        _compile(compiler, source, args, target)
    return target


def _usable(target: Path) -> bool:
    """Whether ``target`` is there, passes the rule and matches its recorded sha256 (a
    library without a record, or not matching it, is compiled again: logged)."""
    if not os.path.lexists(target):
        return False
    problem = cache_trust.library_problem(target)
    if problem:
        LOG.warning("%s is not the library this package built (%s): compiling it again", target, problem)
    return problem is None


def _compile(compiler: str, source: Path, args: Sequence[str], target: Path) -> None:
    with atomic_output(target, private=True) as partial:  # a half-written library never has the final name
        command = [compiler, str(source), *args, "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"compiling {source} failed ({' '.join(command)}):\n{done.stderr.strip()[-2000:]}")
        # Recorded from the bytes this process compiled, before they carry the final name.
        cache_trust.write_digest(target, sha256_file(partial))


def find_built(source: Path, name: str, args: Sequence[str], *, compiler_env: str = "CXX",
               default_compiler: str = "c++", key_extra: Sequence[str] = (),
               build_dir: Optional[Path] = None) -> Optional[Path]:
    """The library :func:`build` would return if it is already built and matches its record,
    else None; never compiles or creates a folder. Raises NativeBuildError without a compiler."""
    compiler = _compiler(compiler_env, default_compiler)
    file_name = _file_name(compiler, source, name, args, key_extra)
    for folder in _trusted_folders(build_dir, create=False):
        target = folder / file_name
        if os.path.lexists(target) and cache_trust.library_problem(target) is None:
            return target
    return None


def load(path: Path, symbols: Sequence[str]) -> ctypes.CDLL:
    """``ctypes.CDLL`` of ``path`` after checking once more its folder and the file against
    the ownership rule and the bytes against their recorded sha256, then that it has every
    function in ``symbols``.

    Raises:
        NativeBuildError: naming the library and what is wrong; nothing of it ran unless
            all the checks before loading passed.
    """
    path = Path(path)
    try:
        cache_trust.private_folder(path.parent, path.parent, create=False)
        problem = cache_trust.library_problem(path)
    except (cache_trust.UntrustedFolder, OSError) as exc:
        problem = str(exc)
    if problem:
        raise NativeBuildError(f"not loading {path}: {problem}")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeBuildError(f"cannot load {path}: {err}") from None
    missing = [symbol for symbol in symbols if not hasattr(library, symbol)]
    if missing:
        raise NativeBuildError(f"{path} has no {', '.join(missing)}: it is not the library this version of "
                               f"vehiclenet builds; delete it and run again")
    return library


@functools.lru_cache(maxsize=None)
def retrieval_kernels() -> Optional[ctypes.CDLL]:
    """``csrc/retrieval_kernels.c`` (re-ranking's Jaccard step, evaluation's hit positions),
    built once per machine with ``$CC`` or ``cc``; None (logged once) where it cannot be
    built or loaded: callers then run the numpy formulations, which give the same results, slower."""
    try:
        path = build(RETRIEVAL_SOURCE, "retrieval_kernels", RETRIEVAL_FLAGS, compiler_env="CC", default_compiler="cc")
        return load(path, RETRIEVAL_SYMBOLS)
    except NativeBuildError as err:
        LOG.info("retrieval kernels unavailable, evaluation and re-ranking run on numpy (slower): %s", err)
        return None
