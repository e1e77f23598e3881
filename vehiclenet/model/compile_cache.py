"""A persistent cache of compiled graphs: a second process skips compilation.

It rides on MindSpore's own compile cache (``enable_compile_cache``), which alone is not safe
to share: measured on MindSpore 2.8.0, it files the n-th graph a process compiles while it is
on as ``compile_cache_<n>.mindir`` in a path read once per process, and checks the Python
sources the graph depends on, but neither the input shapes nor the operators. A batch-2 call
served from a batch-1 entry returned one row; a bf16 network was served the fp32 graph. So:

- the cache is on for one compile per process only: the first graph-mode call of a network
  :func:`vehiclenet.create_network` built for CPU (inference), or the first step of a train
  step built on one (:func:`vehiclenet.training.build_train_step`); later shapes compile as
  usual;
- in a folder of ``compiled/`` under the cache root named by a hash of everything that
  shapes that graph: package version and sources, MindSpore version, device, compile and
  parallel settings, the input's shapes and dtypes, the parameters' names, shapes and dtypes,
  the kernel library and precision, and every cell of the graph: its class, the settings it
  holds (stride, dropout, BatchNorm momentum, the optimizer's weight decay, the loss, ...,
  and the attributes of its operators) and, for a class from outside MindSpore and this
  package, the sha256 of its source file (a graph with a cell whose source cannot be read
  is compiled without the cache);
- only where nobody else can write (:mod:`vehiclenet.cache_trust`: the cache root and
  everything below it owned by this user or root, writable by no one else; folders created
  0700), since a graph names the kernel library its operators load: a ``compiled/`` that
  fails the rule is refused with one warning and the user's own cache folder used instead;
- under an exclusive lock, so two processes filling the same entry take turns;
- the files MindSpore leaves are recorded with their sha256 (``files.json``, written
  atomically) and checked before the next use: an entry that does not match is removed and
  compiled again, never loaded. (MindSpore itself also recompiles an unreadable file.) The
  record names its graph's key and is signed (HMAC-SHA256) with a random key kept in
  ``compiled/.record-key`` (0600): the graph files and record of another entry, copied in
  (a batch-1 graph served a batch-2 call one row), or a record rewritten by anyone who
  cannot read that key, never match.

``VEHICLENET_COMPILE_CACHE=0`` turns it off; a process that enabled MindSpore's compile
cache itself is left alone.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .. import cache_trust, env

LOG = logging.getLogger(__name__)

_RECORD = "files.json"
_LOCK = ".lock"
_SECRET = ".record-key"
_SECRET_BYTES = 32
_used = False  # MindSpore reads the cache path once per process: one cached compile at most


def cache_root() -> Path:
    """Where compiled graphs are kept: ``compiled/`` of the cache root (``VEHICLENET_HOME``)."""
    return env.cache_dir() / env.COMPILED_FOLDER


def graph_key(net: Any, args: Sequence[Any]) -> Optional[str]:
    """Hash of everything that shapes the graph ``net`` compiles for ``args``; None when a cell's
    source cannot be read (such a graph is compiled without the cache)."""
    import mindspore as ms

    import vehiclenet

    cells = _cells(net)
    if cells is None:
        return None
    backend = getattr(_backbone(net), "backend", None)
    parts = {
        "package": vehiclenet.__version__,
        "sources": _sources_digest(),
        "mindspore": ms.__version__,
        "device": ms.get_context("device_target"),
        "jit": _describe(ms.get_context("jit_config")),
        "parallel": _parallel(),
        "inputs": [[list(a.shape), str(a.dtype)] if hasattr(a, "shape") else repr(a) for a in args],
        "parameters": [[p.name, list(p.shape), str(p.dtype)] for p in net.get_parameters()],
        "backend": None if backend is None else [backend.library, backend.precision],
        "training": bool(net.training),
        "cells": cells,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _backbone(net: Any) -> Any:
    """The ResNet-50 of the VehicleNet in ``net`` (the network itself, or a train step around it)."""
    for _, cell in net.cells_and_names():
        if hasattr(cell, "backend") and hasattr(cell, "last_stride"):
            return cell
    return None


def _parallel() -> List[Any]:
    """The data-parallel settings (baked into a training graph) and this worker's rank: each
    worker of a job has its own entry, so none waits on another's lock while compiling."""
    import mindspore as ms

    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode == "stand_alone":
        return [mode]
    from mindspore.communication import get_group_size, get_rank

    try:
        worker = [get_rank(), get_group_size()]
    except RuntimeError:  # the mode is set but no group joined yet
        worker = None
    return [mode, ms.get_auto_parallel_context("gradients_mean"), worker]


def _cells(net: Any) -> Optional[List[Any]]:
    """Every cell of ``net``: its name, class, public settings and operators' attributes (the
    constants MindSpore bakes into a graph); for classes from outside MindSpore and this
    package also their source file's sha256 (their code is the graph). None if unreadable."""
    described = []
    for name, cell in net.cells_and_names():
        cls = type(cell)
        source = None
        if cls.__module__.split(".")[0] not in ("mindspore", "vehiclenet"):
            source = _class_source_digest(cls)
            if source is None:
                LOG.debug("compile cache off: the source of %s.%s cannot be read", cls.__module__, cls.__qualname__)
                return None
        settings = {k: _describe(v) for k, v in vars(cell).items()
                    if not k.startswith("_") and not _is_cell(v)}
        described.append([name, f"{cls.__module__}.{cls.__qualname__}", source, settings])
    return described


def _class_source_digest(cls: type) -> Optional[str]:
    import inspect

    try:
        return hashlib.sha256(Path(inspect.getsourcefile(cls)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return None


def _is_cell(value: Any) -> bool:
    from mindspore import nn

    return isinstance(value, nn.Cell) or (isinstance(value, (list, tuple)) and any(isinstance(v, nn.Cell) for v in value))


def _describe(value: Any) -> Any:
    """A JSON-able, process-independent description of a setting (no addresses or times):
    scalars as they are, tensors by shape, dtype and content hash, parameters by name,
    operators by name and attributes, other objects by class."""
    from mindspore import Parameter, Tensor
    from mindspore.ops import Primitive

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Parameter):
        return ["parameter", value.name]
    if isinstance(value, Tensor):
        data = value.float().asnumpy() if "BFloat16" in str(value.dtype) else value.asnumpy()  # no bf16 in numpy
        return ["tensor", list(data.shape), str(data.dtype), hashlib.sha256(data.tobytes()).hexdigest()]
    if isinstance(value, Primitive):
        return ["operator", value.name, {k: _describe(v) for k, v in sorted(value.attrs.items())}]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return ["object", f"{type(value).__module__}.{type(value).__qualname__}"]


def _sources_digest(root: Optional[Path] = None) -> str:
    """sha256 over the package's Python and C sources, in every sub-package too (a changed
    network never reuses a graph, wherever its module lives)."""
    root = Path(__file__).resolve().parent.parent if root is None else root
    digest = hashlib.sha256()
    files = [p for p in root.rglob("*") if p.is_file() and (p.suffix == ".py" or "csrc" in p.relative_to(root).parts)]
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _wanted() -> bool:
    """Whether this compile may use the cache (on, not used yet, MindSpore's cache not the user's)."""
    if _used or not env.compile_cache():
        return False
    import mindspore as ms

    if ms.get_context("enable_compile_cache") or os.environ.get("MS_COMPILER_CACHE_ENABLE", "") == "1":
        return False
    return _dependencies_readable()


def _dependencies_readable() -> bool:
    """Whether MindSpore can list the sources the graph depends on (it reads the entry script's
    imports when the cache is on, and raises on some, e.g. a relative import in ``-m`` mains):
    better no cache than a failed compile."""
    from mindspore.common import api

    try:
        api._get_compile_cache_dep_files()
    except Exception as exc:  # noqa: BLE001 - any failure here means: compile without the cache
        LOG.debug("compile cache off: MindSpore cannot list the graph's source files (%s)", exc)
        return False
    return True


@contextlib.contextmanager
def first_compile(net: Any, args: Sequence[Any]) -> Iterator[None]:
    """Around the first graph compile of ``net`` in this process: load it from, or file it in,
    its cache entry. Any other compile passes through untouched."""
    global _used
    if not _wanted():
        yield
        return
    _used = True
    key = graph_key(net, args)
    entry = None if key is None else _entry(key)
    if entry is None:
        yield
        return
    try:
        lock = contextlib.ExitStack()
        lock.enter_context(_locked(entry / _LOCK))
    except OSError as exc:  # an unusable cache folder must not stop inference
        LOG.warning("compile cache unusable (%s): compiling without it", exc)
        yield
        return
    with lock:
        key = entry.name
        secret = _secret(entry.parent)
        before = _trusted_files(entry, key, secret)
        with _mindspore_cache(entry):
            yield
        _private_modes(entry)
        after = _files(entry)
        _record(entry, key, secret, after)
    LOG.info("compile cache %s: %s", "hit" if before and before == after else "filled", entry)


def _entry(key: str) -> Optional[Path]:
    """The folder of the graph ``key``: in ``compiled/`` of the cache root, or of the user's
    own cache folder when that fails :mod:`vehiclenet.cache_trust`'s ownership rule (a
    compiled graph names the kernel library its operators load); created 0700. None (and a
    warning) when neither may be used or created."""
    roots = [env.cache_dir(), env.user_cache_dir()]
    candidates = [(root / env.COMPILED_FOLDER / key, root) for i, root in enumerate(roots) if root not in roots[:i]]
    return cache_trust.first_trusted(candidates, "compiled graphs", "compiling without the cache")[0]


def _locked(lock_file: Path):
    from ..fileio import file_lock

    return file_lock(lock_file, env.lock_timeout())


@contextlib.contextmanager
def _mindspore_cache(entry: Path) -> Iterator[None]:
    import mindspore as ms

    ms.set_context(enable_compile_cache=True, compile_cache_path=str(entry))
    try:
        yield
    finally:
        ms.set_context(enable_compile_cache=False)  # later compiles would land in this entry


def _files(entry: Path) -> Dict[str, Dict[str, Any]]:
    """Every file MindSpore keeps in ``entry``: sha256, size and mtime (a rewrite shows)."""
    found = {}
    for path in sorted(entry.rglob("*")):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) or (path.parent == entry and path.name in (_RECORD, _LOCK)):
            continue
        # A link, or a file someone else could write, never matches a record: the entry is compiled again.
        problem = cache_trust.file_problem(path)
        found[str(path.relative_to(entry))] = {"sha256": f"refused: {problem}" if problem else _sha256(path),
                                               "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return found


def _sha256(path: Path) -> str:
    from ..fileio import sha256_file

    return sha256_file(path)


def _trusted_files(entry: Path, key: str, secret: Optional[bytes]) -> Optional[Dict[str, Dict[str, Any]]]:
    """The entry's files if they are exactly those recorded, for this key and signed with this
    cache's secret, after a good compile; otherwise (none recorded, another entry's record,
    a bad signature, missing, changed or extra files) the entry is emptied and None returned."""
    try:
        record = json.loads((entry / _RECORD).read_text())
        recorded = record["files"] if _signed(record, key, secret) else None
    except (OSError, ValueError, TypeError, KeyError):
        recorded = None
    found = _files(entry)
    refused = any(v["sha256"].startswith("refused") for v in found.values())
    if (isinstance(recorded, dict) and recorded and not refused
            and {k: v["sha256"] for k, v in found.items()} == {k: v.get("sha256") for k, v in recorded.items()}):
        return found
    if found:
        LOG.warning("compile cache entry %s does not match its record: compiling it again", entry)
    _empty(entry)
    return None


def _empty(entry: Path) -> None:
    for path in entry.iterdir():
        if path.name == _LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _private_modes(entry: Path) -> None:
    """Take group and world write off the files MindSpore just wrote in ``entry`` (it
    follows the umask, which may allow them; cache_trust would then refuse them)."""
    for path in entry.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o022:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)


def _record(entry: Path, key: str, secret: Optional[bytes], files: Dict[str, Dict[str, Any]]) -> None:
    from ..fileio import atomic_write

    if secret is None:  # no key to sign with: leave no record, so the entry is never trusted
        return
    record = {"key": key, "files": files, "hmac": _mac(key, files, secret)}
    with atomic_write(entry / _RECORD, "w", private=True) as f:
        json.dump(record, f, indent=1, sort_keys=True)


def _mac(key: str, files: Dict[str, Dict[str, Any]], secret: bytes) -> str:
    import hmac

    message = json.dumps({"key": key, "files": {k: v["sha256"] for k, v in files.items()}}, sort_keys=True)
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def _signed(record: Any, key: str, secret: Optional[bytes]) -> bool:
    import hmac

    return (secret is not None and isinstance(record, dict) and record.get("key") == key
            and isinstance(record.get("files"), dict) and isinstance(record.get("hmac"), str)
            and hmac.compare_digest(record["hmac"], _mac(key, record["files"], secret)))


def _secret(folder: Path) -> Optional[bytes]:
    """This cache's signing key (``<folder>/.record-key``, random, 0600), created on first use.
    None (the entry is then neither trusted nor recorded) when it cannot be made or read, or
    is not a private regular file of this user."""
    from ..fileio import create_private_file, open_regular

    path = folder / _SECRET
    try:
        if not os.path.lexists(path):
            create_private_file(path, os.urandom(_SECRET_BYTES))
    except FileExistsError:
        pass  # another process made it meanwhile: theirs is the key
    except OSError as exc:
        LOG.warning("compile cache: cannot create its signing key %s (%s): graphs are compiled again", path, exc)
        return None
    try:
        with open(open_regular(path, os.O_RDONLY), "rb") as fh:
            st = os.fstat(fh.fileno())
            secret = fh.read(_SECRET_BYTES + 1)
    except OSError as exc:
        LOG.warning("compile cache: cannot read its signing key %s (%s): graphs are compiled again", path, exc)
        return None
    if len(secret) != _SECRET_BYTES or (cache_trust.enforced() and (st.st_uid != os.geteuid() or st.st_mode & 0o077)):
        LOG.warning("compile cache: %s is not a private %d-byte key of this user: graphs are compiled again; "
                    "delete it to make a new one", path, _SECRET_BYTES)
        return None
    return secret
