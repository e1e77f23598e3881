"""A persistent cache of compiled graphs: a second process skips compilation.

It rides on MindSpore's own compile cache (``enable_compile_cache``), which alone is not safe
to share: measured on MindSpore 2.8.0, it files the n-th graph a process compiles while it is
on as ``compile_cache_<n>.mindir`` in a path read once per process, and checks the Python
sources the graph depends on, but neither the input shapes nor the operators. A batch-2 call
served from a batch-1 entry returned one row; a bf16 network was served the fp32 graph. So:

- the cache is on for one compile per process only: the first graph-mode call of a network
  :func:`vehiclenet.create_network` built for CPU (inference), or the first step of a train
  step built on one (:func:`vehiclenet.training.finetune.build_train_step`); later shapes
  compile as usual;
- in a folder of ``compiled/`` under the cache root named by
  :func:`vehiclenet.model.graph_key.graph_key`, a hash of what shapes that graph
  (versions and sources, device, context, parallel settings, inputs, parameters, kernel
  library, and every cell with the attributes and operators it holds); a graph with something that key cannot describe reliably (a hook, a
  source that cannot be read, an object of an unknown class, a sharding parallel mode) is
  compiled without the cache;
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
from typing import Any, Dict, Iterator, Optional, Sequence

from .. import cache_trust, env
from .graph_key import graph_key

LOG = logging.getLogger(__name__)

_RECORD = "files.json"
_LOCK = ".lock"
_SECRET = ".record-key"
_SECRET_BYTES = 32
_used = False  # MindSpore reads the cache path once per process: one cached compile at most


def cache_root() -> Path:
    """Where compiled graphs are kept: ``compiled/`` of the cache root (``VEHICLENET_HOME``)."""
    return env.cache_dir() / env.COMPILED_FOLDER


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
    try:
        key = graph_key(net, args)
    except Exception as exc:  # noqa: BLE001 - a key that cannot be made means: compile without the cache
        LOG.debug("compile cache off: no key for this graph (%r)", exc)
        key = None
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
