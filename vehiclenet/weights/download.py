"""Verified delivery of checkpoint files into the local cache.

Guarantees:

* a file appears under its final name only after its sha256 matched the manifest
  (bytes stream into ``<file>.part`` in the same folder, are hashed as they arrive,
  fsync'ed, then atomically renamed);
* an interrupted transfer resumes with an HTTP Range request; servers that ignore
  Range (200 instead of 206) and connections that drop mid-body are handled;
* connect/read timeouts, capped exponential backoff on connection errors, timeouts and
  429/5xx (honouring Retry-After), then the next URL, then one error listing every URL
  and what failed;
* a server that trickles is abandoned (next URL) in bounded time, the read timeout T of
  ``VEHICLENET_TIMEOUT`` setting the pace: its status line and headers must be complete
  within T, and at least 64 KiB (or all that is left) of the body must arrive in every
  window of T seconds, so a body sent one byte at a time is given up within 2T;
* never more bytes than the file has: a body longer than its Content-Length or, without
  one, the manifest's ``size`` is stopped at the first chunk that would pass it (that chunk
  is not written); the free-space check uses the manifest's ``size`` when the server sends
  no length;
* one download per asset across processes (file lock with a timeout, re-check after
  acquiring it);
* a cached file is checked before use (size always, full sha256 once per process); a
  corrupted entry is set aside as ``<file>.corrupt`` and fetched again, with a warning;
* no cache name is ever followed: a link, FIFO, device or socket at the file's, the
  ``.part``'s or the lock's name (or a ``.part`` with other hard links) is moved aside as
  ``<name>.corrupt`` with a warning naming it, and what it points to is never read or
  written; a folder there is refused;
* URLs in logs and errors never show credentials (``user:password@`` becomes ``***@``).

Environment (declared and read in :mod:`vehiclenet.env`): ``VEHICLENET_HOME`` (cache root),
``VEHICLENET_MIRROR``, ``VEHICLENET_OFFLINE``, ``VEHICLENET_TIMEOUT``, ``VEHICLENET_RETRIES``,
``VEHICLENET_BACKOFF``, ``VEHICLENET_LOCK_TIMEOUT``.

Heavy imports (requests, filelock, tqdm) happen inside the functions that need them so
``vehiclenet verify`` starts fast.
"""
import contextlib
import hashlib
import logging
import os
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import quote, urljoin

from .assets import LOCK_DIR, Asset, get_asset, redact_url, url_problem
from .. import env
from ..env import cache_dir  # noqa: F401 (re-exported: the cache root is part of this module's API)
from ..errors import DownloadChecksumError, DownloadError, OfflineError
from ..fileio import LockFileError, NotRegularFileError, describe_entry, file_lock, hash_stream, open_regular, publish
from ..fileio import sha256_file  # noqa: F401 (re-exported: part of this module's API since 0.x)

log = logging.getLogger(__name__)

# The variables' names, for messages (declared, parsed and read in vehiclenet.env).
ENV_HOME, ENV_MIRROR, ENV_OFFLINE, ENV_TIMEOUT = env.HOME, env.MIRROR, env.OFFLINE, env.TIMEOUT
ENV_LOCK_TIMEOUT = env.LOCK_TIMEOUT

CHUNK = 1 << 20  # largest network read: 1 MiB
MIN_PROGRESS = 64 << 10  # bytes that must arrive in every read-timeout window (see _RateWatch)
DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT = env.default(env.TIMEOUT)
DEFAULT_RETRIES = env.default(env.RETRIES)
DEFAULT_BACKOFF = env.default(env.BACKOFF)  # 0.5: retries wait 0, 1, 2, 4 s (urllib3 skips the first wait)
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 120.0
DEFAULT_LOCK_TIMEOUT = env.default(env.LOCK_TIMEOUT)  # an hour: a 300 MB download on a slow link takes minutes
MAX_REDIRECTS = 10
MAX_RESUMES = 1000
RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "vehiclenet-downloader"

PART_SUFFIX = ".part"
CORRUPT_SUFFIX = ".corrupt"

# (device, inode, size, mtime_ns) -> sha256 of files hashed by this process, so a cached
# file costs one full hash per process, not one per use.
_verified: Dict[Tuple[int, int, int, int], str] = {}
_verified_lock = threading.Lock()


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DownloadSettings:
    """Network behaviour of :func:`fetch`; ``from_env`` fills gaps from the environment."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    max_backoff: float = MAX_BACKOFF
    max_retry_after: float = MAX_RETRY_AFTER
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    @classmethod
    def from_env(
        cls,
        timeout: Union[None, float, Tuple[float, float]] = None,
        retries: Optional[int] = None,
        backoff: Optional[float] = None,
        lock_timeout: Optional[float] = None,
    ) -> "DownloadSettings":
        if timeout is None:
            connect, read = env.timeouts()
        elif isinstance(timeout, tuple):
            connect, read = timeout
        else:
            connect, read = min(DEFAULT_CONNECT_TIMEOUT, float(timeout)), float(timeout)
        return cls(
            connect_timeout=connect,
            read_timeout=read,
            retries=env.retries() if retries is None else retries,
            backoff=env.backoff() if backoff is None else backoff,
            lock_timeout=env.lock_timeout() if lock_timeout is None else lock_timeout,
        )

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based), capped."""
        return min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))


# --------------------------------------------------------------------------- cache


def cached_path(asset: Union[Asset, str, None] = None) -> Path:
    """Where ``asset`` lives in the cache (whether or not it is there yet)."""
    if not isinstance(asset, Asset):
        asset = get_asset(asset)
    return cache_dir() / asset.file


def part_path(final: Path) -> Path:
    """The in-progress download next to ``final`` (same folder, so rename is atomic)."""
    return final.with_name(final.name + PART_SUFFIX)


def _lock_path(final: Path) -> Path:
    # Locks live in a sub-folder so the cache folder itself holds only checkpoints.
    return final.parent / LOCK_DIR / (final.name + ".lock")


def _stat_key(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(path: Path, sha: str) -> None:
    try:
        key = _stat_key(os.lstat(path))
    except OSError:
        return
    with _verified_lock:
        _verified[key] = sha


def check_cached(asset: Asset, path: Optional[Path] = None, *, full: bool = False) -> Optional[str]:
    """Problem with the cached copy of ``asset``, or None if it is good.

    Checks the size always and the full sha256 unless this process already hashed this
    very file (same inode, size and mtime); ``full=True`` always hashes.
    Returns ``"missing"`` when there is no file. Only a regular file counts: a link (even
    to the right bytes), FIFO or device under the cache's name is a problem, never followed.
    """
    path = path or cached_path(asset)
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing"
    except NotRegularFileError as exc:
        return f"it is {exc.what}, and the cache uses only regular files it wrote itself"
    with open(fd, "rb", buffering=0) as f:
        key = _stat_key(os.fstat(f.fileno()))
        size = key[2]
        if asset.size is not None and size != asset.size:
            return f"size is {size} bytes, the manifest says {asset.size}"
        with _verified_lock:
            known = None if full else _verified.get(key)
        if known is None:
            known = hash_stream(f).hexdigest()
            with _verified_lock:
                _verified[key] = known
    if known != asset.sha256:
        return f"sha256 is {known}, the manifest says {asset.sha256}"
    return None


def _set_aside(path: Path, problem: str, refetch: bool = True) -> Path:
    # Keep one copy for inspection rather than deleting: the user may want to know what
    # was there. Only one .corrupt per asset, so a 300 MB file cannot pile up.
    aside = _move_aside(path, problem)
    # Offline nothing is fetched, so the log must not promise it (the OfflineError says what to do).
    then = "fetching it again" if refetch else f"not fetching it again because {ENV_OFFLINE} is set"
    log.warning("cached file %s is corrupted (%s); moved it to %s and %s", path, problem, aside, then)
    return aside


def _move_aside(path: Path, what: str) -> Path:
    """Rename ``path`` (the entry itself: a link is moved, not followed) to ``<name>.corrupt``."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise DownloadError(
            f"{path} is {what}; it could not be moved aside to {aside} ({exc.strerror or exc}): "
            f"remove or rename {path} yourself, then run the command again"
        ) from None
    return aside


def _clear_entry(asset: Asset, path: Path, role: str, *, folder: bool = False, single_link: bool = False) -> None:
    """Make sure only what the cache itself creates sits at ``path`` (or nothing).

    A link, FIFO, device or socket (or, with ``single_link``, a file with other hard links)
    was not put there by vehiclenet: it is moved aside untouched, with a warning naming it,
    so nothing is ever written or read through it. A folder where a file belongs may hold
    someone's data: refused, not moved.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if folder and stat.S_ISDIR(st.st_mode):
        return
    if not folder and stat.S_ISREG(st.st_mode) and (not single_link or st.st_nlink == 1):
        return
    if stat.S_ISDIR(st.st_mode):
        raise DownloadError(
            f"{path} is a directory, but the cache keeps {role} of {asset.name} under that name; "
            f"remove or rename it, then run `vehiclenet download {asset.name}` again"
        )
    what = describe_entry(path, st) if not stat.S_ISREG(st.st_mode) else (
        f"a file with {st.st_nlink - 1} other hard link(s)")
    aside = _move_aside(path, what)
    log.warning("%s is %s, which vehiclenet never puts there; moved it to %s without following it or "
                "writing to it (check who else writes to %s)", path, what, aside, path.parent)


# --------------------------------------------------------------------------- fetch


def fetch(
    asset_or_name: Union[Asset, str, None] = None,
    *,
    force: bool = False,
    progress: Optional[bool] = None,
    offline: Optional[bool] = None,
    timeout: Union[None, float, Tuple[float, float]] = None,
    retries: Optional[int] = None,
    backoff: Optional[float] = None,
    lock_timeout: Optional[float] = None,
) -> Path:
    """Path of a verified local copy of an asset, downloading it if needed.

    ``asset_or_name``: an :class:`Asset`, an asset name, or None for the manifest's
    default. ``force``: download again even if a good copy is cached. ``progress``: a
    progress bar on stderr (None = only when stderr is a terminal). ``offline``: never
    touch the network (None = ``$VEHICLENET_OFFLINE``). ``timeout`` (seconds, or
    ``(connect, read)``), ``retries``, ``backoff`` and ``lock_timeout`` override the
    environment/defaults.

    Raises :class:`OfflineError`, :class:`DownloadChecksumError` or
    :class:`DownloadError`; never returns a path whose sha256 was not checked.
    """
    asset = asset_or_name if isinstance(asset_or_name, Asset) else get_asset(asset_or_name)
    if offline is None:
        offline = env.offline()
    path = cached_path(asset)
    _refuse_non_file(asset, path)

    # Fast path without the lock: a finished file is only ever replaced by an atomic
    # rename, so reading it while another process works is safe.
    problem = None if force else check_cached(asset, path)
    if problem is None and not force:
        log.debug("using cached %s", path)
        return path

    if offline:
        if force:
            raise OfflineError(
                f"--force needs the network but {ENV_OFFLINE} is set; unset it to download {asset.name} again"
            )
        if problem != "missing":
            _with_lock(asset, path, DownloadSettings.from_env(lock_timeout=lock_timeout),
                       lambda asset, path: _set_aside_if_bad(asset, path, refetch=False))
        raise OfflineError(_offline_message(asset, path, problem))

    settings = DownloadSettings.from_env(timeout, retries, backoff, lock_timeout)

    def locked(asset: Asset, path: Path) -> Path:
        # Another process may have finished the download while we waited for the lock.
        if not force:
            if check_cached(asset, path) is None:
                log.info("%s was downloaded by another process", path)
                return path
            _set_aside_if_bad(asset, path)
        else:
            part = part_path(path)
            _clear_entry(asset, part, "the partial download")
            part.unlink(missing_ok=True)
        _download(asset, path, settings, progress)
        return path

    return _with_lock(asset, path, settings, locked)


def not_a_file_problem(path: Path) -> Optional[str]:
    """What sits at ``path`` if it exists but is not a regular file (a folder, a socket...), else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # absent, or a dangling symlink the rename will simply replace
    if stat.S_ISREG(mode):
        return None
    return "a directory" if stat.S_ISDIR(mode) else "not a regular file"


def _refuse_non_file(asset: Asset, path: Path) -> None:
    # Checked before any byte is fetched: the final rename onto a folder would fail only
    # after the whole transfer. The folder may hold the user's data, so it is not removed.
    # A link or FIFO there (not a folder: lstat) is moved aside later, under the lock.
    try:
        is_folder = stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        is_folder = False
    if is_folder:
        raise DownloadError(
            f"{path} is a directory, but the cache keeps the file of {asset.name} under that name; "
            f"remove or rename it, then run `vehiclenet download {asset.name}` again"
        )


def _set_aside_if_bad(asset: Asset, path: Path, refetch: bool = True) -> None:
    problem = check_cached(asset, path)
    if problem not in (None, "missing"):
        _set_aside(path, problem, refetch)


def _with_lock(asset: Asset, path: Path, settings: DownloadSettings, func: Any) -> Any:
    lock_file = _lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_entry(asset, lock_file.parent, "the lock folder", folder=True)
        lock_file.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"cannot create the cache folder {lock_file.parent}: {exc}; set {ENV_HOME} to a writable folder"
        ) from None
    _clear_entry(asset, lock_file, "the lock file")
    try:
        with file_lock(lock_file, settings.lock_timeout):
            return func(asset, path)
    except LockFileError as exc:
        raise DownloadError(str(exc)) from None
    except TimeoutError:
        raise DownloadError(
            f"another process has been fetching {asset.file} for more than {settings.lock_timeout:g} s "
            f"(lock {lock_file}); wait for it, or raise {ENV_LOCK_TIMEOUT}"
        ) from None


def _offline_message(asset: Asset, path: Path, problem: Optional[str]) -> str:
    if problem == "missing":
        state = f"is not in the cache: {path}"
    else:
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        state = f"is in the cache but corrupted ({problem}); it was moved to {aside}, a verified copy belongs at {path}"
    url = redact_url(asset.urls[0])
    return (
        f"{ENV_OFFLINE} is set and {asset.name} {state}\n"
        f"To fix: on a machine with network run `vehiclenet download {asset.name}` and copy the file to {path}, "
        f"or download {url} yourself and put it there (sha256 {asset.sha256}; "
        f"`vehiclenet verify {path}` checks it), or unset {ENV_OFFLINE} to let vehiclenet download it."
    )


def candidate_urls(asset: Asset) -> List[str]:
    """URLs to try in order: ``$VEHICLENET_MIRROR/<file>`` first, then the manifest's."""
    urls: List[str] = []
    mirror = env.mirror()
    if mirror:
        url = mirror.rstrip("/") + "/" + quote(asset.file)
        problem = url_problem(url)
        if problem:
            message = f"{ENV_MIRROR}={mirror!r}: the URL {url} {problem}; fix or unset {ENV_MIRROR}"
            raise DownloadError(redact_url(message))
        urls.append(url)
    urls.extend(u for u in asset.urls if u not in urls)
    return urls


class _UrlFailed(Exception):
    """This URL cannot deliver the asset; try the next one."""


class _Mismatch(_UrlFailed):
    pass


class _Unreachable(_UrlFailed):
    """The URL's host does not resolve or refuses connections (no retries were made)."""


def _download(asset: Asset, final: Path, settings: DownloadSettings, progress: Optional[bool]) -> None:
    urls = candidate_urls(asset)
    failures: List[Tuple[str, str]] = []
    mismatches = unreachable = 0
    session = _session(settings)
    try:
        for url in urls:
            try:
                _download_url(session, url, asset, final, settings, progress)
            except _UrlFailed as exc:
                mismatches += isinstance(exc, _Mismatch)
                unreachable += isinstance(exc, _Unreachable)
                # Masked once here: the failure lines reach logs and the final error.
                failures.append((redact_url(url), redact_url(str(exc))))
                # An unreachable host is said once, in the error listing every URL.
                log.log(logging.INFO if isinstance(exc, _Unreachable) else logging.WARNING, "%s: %s", *failures[-1])
                continue
            _remember(final, asset.sha256)
            log.info("downloaded and verified %s from %s", final, redact_url(url))
            return
    finally:
        session.close()
    if unreachable == len(failures):
        raise DownloadError(
            f"cannot reach any server of {asset.name} (is this machine offline?):\n"
            + "\n".join(f"  {url}: {reason}" for url, reason in failures) + "\n"
            f"To fix: connect to the network (or set HTTPS_PROXY or {ENV_MIRROR}), or put {asset.file} at {final}; "
            "or load weights you have (--checkpoint FILE; create_network(checkpoint=...)), or use random weights "
            f"(--no-pretrained; pretrained=False). {ENV_OFFLINE}=1 never tries the network."
        )
    listing = "\n".join(f"  {url}\n    -> {reason}" for url, reason in failures)
    if mismatches == len(failures):
        raise DownloadChecksumError(
            f"every URL of {asset.name} served bytes with the wrong sha256; nothing was kept and nothing loaded:\n"
            f"{listing}\n"
            f"To fix: the files on the server differ from the manifest {asset.manifest}. If the manifest is yours, "
            f"check its sha256; otherwise try a trusted mirror ({ENV_MIRROR}) or report it."
        )
    raise DownloadError(
        f"could not download {asset.name} ({asset.file}):\n{listing}\n"
        f"To fix: check the network or proxy (HTTPS_PROXY), set {ENV_MIRROR} to a server holding {asset.file}, "
        f"or fetch one of the URLs yourself and put the file at {final} (`vehiclenet verify {final}` checks it)."
    )


def _session(settings: DownloadSettings) -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    cap = settings.max_retry_after

    class CappedRetry(Retry):
        # A server asking for an hour's pause should not freeze the caller for an hour.
        def parse_retry_after(self, retry_after: str) -> float:
            return min(super().parse_retry_after(retry_after), cap)

        def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
            # A host that does not resolve or refuses the connection will not answer a second
            # later: no retries, no backoff (offline, a machine waited ~15 s per command).
            if error is not None and _unreachable(error):
                from urllib3.exceptions import MaxRetryError

                raise MaxRetryError(_pool, url, error) from error
            return super().increment(method, url, response, error, _pool, _stacktrace)

    pools = _deadline_pools(settings.read_timeout)

    class DeadlineAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            # Direct connections; through a proxy the proxy manager's own pools are used.
            self.poolmanager.pool_classes_by_scheme = pools

    retry_kwargs: Dict[str, Any] = dict(
        total=None,
        connect=settings.retries,
        read=settings.retries,
        status=settings.retries,
        other=0,
        redirect=0,
        allowed_methods=frozenset(["GET"]),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=settings.backoff,
        raise_on_status=False,
        raise_on_redirect=False,
        respect_retry_after_header=True,
    )
    import inspect

    if "backoff_max" in inspect.signature(Retry.__init__).parameters:
        retry_kwargs["backoff_max"] = settings.max_backoff
    session = requests.Session()
    adapter = DeadlineAdapter(max_retries=CappedRetry(**retry_kwargs), pool_connections=2, pool_maxsize=2)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # Compressed transfer would make Content-Length and Range offsets refer to other bytes.
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
    return session


def _unreachable(error: BaseException) -> bool:
    """Whether a connection error means the host cannot be reached now: its name does not
    resolve, or it (or the network) refuses or has no route; not a timeout or a reset."""
    import errno

    from urllib3.exceptions import NewConnectionError

    if not isinstance(error, NewConnectionError):
        return False
    if type(error).__name__ == "NameResolutionError":  # urllib3 2
        return True
    cause = error.__cause__ or error.__context__
    if isinstance(cause, socket.gaierror):
        return True
    return isinstance(cause, OSError) and cause.errno in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)


class _SlowHeaders(Exception):
    """The server did not finish its status line and headers within the deadline.

    Not an OSError, so urllib3 does not retry it: a server that trickles is abandoned."""


class _HeaderCutter:
    """Shuts a connection's socket down if its response headers are not complete in time."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.done = False
        self.fired = False

    def cut(self) -> None:
        with self.lock:
            if self.done:
                return
            self.fired = True
            sock = getattr(self.conn, "sock", None)
            if sock is not None:
                # The plain socket's shutdown (also under TLS): the blocked read sees end-of-file
                # at once; SSLSocket.shutdown would change its state under the reading thread.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def finish(self) -> bool:
        """Stop the timer's effect; True if the deadline had already passed."""
        with self.lock:
            self.done = True
            return self.fired


def _deadline_pools(seconds: float) -> Dict[str, Any]:
    """urllib3 pool classes whose connections give a server ``seconds`` for its whole status
    line and headers. The socket timeout bounds only the wait for each byte, so a server
    sending one byte every few seconds would otherwise never be given up on."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Deadline:
        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            cutter = _HeaderCutter(self)
            timer = threading.Timer(seconds, cutter.cut)
            timer.daemon = True
            timer.start()
            try:
                resp = super().getresponse(*args, **kwargs)  # type: ignore[misc]
            except Exception:
                if cutter.finish():
                    raise _SlowHeaders(seconds) from None
                raise
            finally:
                timer.cancel()
            if cutter.finish():  # complete, but only as the socket was being cut
                raise _SlowHeaders(seconds)
            return resp

    class Conn(Deadline, HTTPConnection):
        pass

    class SecureConn(Deadline, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = SecureConn

    return {"http": Pool, "https": SecurePool}


def _get(session: Any, url: str, settings: DownloadSettings, headers: Dict[str, str]) -> Any:
    """GET with redirects followed by hand, so a redirect to plain http is refused."""
    import requests

    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            resp = session.get(
                current,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(settings.connect_timeout, settings.read_timeout),
            )
        except requests.exceptions.RequestException as exc:
            reason = getattr(exc.args[0] if exc.args else None, "reason", None)
            failed = _Unreachable if isinstance(reason, BaseException) and _unreachable(reason) else _UrlFailed
            raise failed(_describe(exc, settings)) from None
        except _SlowHeaders:
            raise _UrlFailed(f"too slow: the response headers took more than {settings.read_timeout:g} s "
                             f"(the read timeout, {ENV_TIMEOUT}); abandoned") from None
        if resp.is_redirect:
            target = urljoin(current, resp.headers.get("Location", ""))
            resp.close()
            problem = url_problem(target)
            if problem:
                raise _UrlFailed(f"redirected to {target}, which {problem}; refused")
            current = target
            continue
        return resp
    raise _UrlFailed(f"more than {MAX_REDIRECTS} redirects")


def _describe(exc: BaseException, settings: Optional[DownloadSettings] = None) -> str:
    import requests

    text = redact_url(str(exc))  # requests quotes the URL in some messages
    if isinstance(exc, requests.exceptions.ConnectTimeout) or (
        isinstance(exc, requests.exceptions.ConnectionError) and "ConnectTimeoutError" in text
    ):
        extra = f" ({settings.connect_timeout:g} s)" if settings else ""
        return f"connection timed out{extra}"
    if isinstance(exc, requests.exceptions.ReadTimeout) or "Read timed out" in text:
        extra = f" (no data for {settings.read_timeout:g} s)" if settings else ""
        return f"read timed out{extra}"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS/SSL error: {text}"
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "getaddrinfo failed" in text or "NameResolutionError" in text:
        return "host name could not be resolved"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in text:
        return "connection dropped mid-transfer"
    return f"{type(exc).__name__}: {text}"


def _content_range(value: str) -> Tuple[int, Optional[int]]:
    # "bytes START-END/TOTAL" (TOTAL may be "*")
    try:
        unit, spec = value.strip().split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, None if total.strip() == "*" else int(total)
    except ValueError:
        raise _UrlFailed(f"unreadable Content-Range header {value!r}") from None


def _download_url(
    session: Any, url: str, asset: Asset, final: Path, settings: DownloadSettings, progress: Optional[bool]
) -> None:
    """Bring ``<final>.part`` to the full verified file from ``url`` and rename it to ``final``.

    The partial file is opened once (never through a link, FIFO or device) and every read,
    write and truncation goes through that descriptor, so no other file is ever touched.
    """
    part = part_path(final)
    with _open_part(asset, part) as out:
        try:
            _fetch_into(session, url, asset, out, part, settings, progress)
        except BaseException:
            if out.seek(0, os.SEEK_END) == 0:  # nothing to resume: leave no empty .part behind
                _unlink_if_same(out, part)
            raise
        _publish(out, part, final)


def _open_part(asset: Asset, part: Path) -> Any:
    """``<file>.part`` opened read/write as a binary file object, created if absent."""
    _clear_entry(asset, part, "the partial download", single_link=True)
    try:
        fd = open_regular(part, os.O_RDWR | os.O_CREAT, single_link=True)
    except NotRegularFileError as exc:  # it changed between the check above and the open
        raise DownloadError(f"{part} became {exc.what} while it was being opened; nothing was written to it. "
                            f"Check who else writes to {part.parent}, then run the command again") from None
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; make {part.parent} writable or set "
                            f"{ENV_HOME} to another folder") from None
    return os.fdopen(fd, "r+b")


def _publish(out: Any, part: Path, final: Path) -> None:
    """Rename the verified ``part`` to ``final``, if ``part`` is still the file we wrote."""
    mine, there = os.fstat(out.fileno()), os.lstat(part)
    if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
        raise DownloadError(f"{part} was replaced by something else during the download; it was not published. "
                            f"Check who else writes to {part.parent}, then run the command again")
    publish(part, final, fd=out.fileno())  # the same durable rename as every other output


def _progress_bar(asset: Asset, offset: int, progress: Optional[bool]) -> Any:
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    return tqdm(
        total=asset.size,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=asset.file if len(asset.file) <= 40 else asset.file[:37] + "...",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


@dataclass
class _Transfer:
    """What ``<file>.part`` holds so far: the open file, its length and the sha256 of its bytes."""

    asset: Asset
    out: Any
    part: Path
    bar: Any
    hasher: Any = field(default_factory=hashlib.sha256)
    offset: int = 0
    from_disk: bool = False  # the bytes come from an earlier run and may be stale

    def restart(self) -> None:
        """Forget every byte received: empty the file and the hash."""
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.from_disk = False
        self.out.seek(0)
        self.out.truncate()
        self.bar.reset(total=self.asset.size)

    def append(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.hasher.update(chunk)
        self.offset += len(chunk)
        self.bar.update(len(chunk))


def _resume(asset: Asset, out: Any, part: Path, progress: Optional[bool]) -> _Transfer:
    """A transfer continuing from what ``out`` already holds (hashed once), or from byte 0."""
    offset = out.seek(0, os.SEEK_END)
    if asset.size is not None and offset > asset.size:
        out.truncate(0)
        offset = 0
    t = _Transfer(asset, out, part, _progress_bar(asset, offset, progress))
    if offset:
        out.seek(0)
        t.hasher, t.offset, t.from_disk = hash_stream(out), offset, True
        log.info("resuming %s at byte %d", part, offset)
    return t


@dataclass
class _Attempts:
    """Retry accounting of one URL: failures without progress cost a retry and a backoff
    pause; a drop after progress resumes at once (bounded, so no server can loop forever)."""

    settings: DownloadSettings
    shown: str  # the URL as logs show it (credentials masked)
    failed: int = 0
    resumes: int = 0

    def after_error(self, exc: BaseException, progressed: bool, offset: int) -> None:
        """Wait as the error deserves before the next request, or raise _UrlFailed."""
        reason = _describe(exc, self.settings)
        if progressed:
            self.resumes += 1
            self.failed = 0
            if self.resumes > MAX_RESUMES:
                raise _UrlFailed(f"{reason}; gave up after {self.resumes} resumes") from None
            log.info("%s: %s at byte %d; resuming", self.shown, reason, offset)
            return
        self.failed += 1
        if self.failed > self.settings.retries:
            raise _UrlFailed(f"{reason}; gave up after {self.settings.retries} retries") from None
        delay = self.settings.backoff_delay(self.failed)
        log.info("%s: %s at byte %d; retrying in %.1f s", self.shown, reason, offset, delay)
        time.sleep(delay)


def _fetch_into(session: Any, url: str, asset: Asset, out: Any, part: Path, settings: DownloadSettings,
                progress: Optional[bool]) -> None:
    """Stream ``url`` into ``out`` (resuming what it holds) until its bytes have the manifest's sha256."""
    t = _resume(asset, out, part, progress)
    attempts = _Attempts(settings, redact_url(url))
    try:
        while not (_attempt(session, url, t, attempts) and _hash_matches(t)):
            pass
    finally:
        t.bar.close()


def _attempt(session: Any, url: str, t: _Transfer, attempts: _Attempts) -> bool:
    """One GET: True when ``t`` then holds a whole body to verify, False to send another request."""
    import requests

    settings = attempts.settings
    resp = _get(session, url, settings, {"Range": f"bytes={t.offset}-"} if t.offset else {})
    with resp:
        action, total = _decide(resp, t, attempts)
        if action != "stream":
            return action == "verify"
        expected = total if total is not None else t.asset.size
        if expected is not None:  # the manifest's size when the server sends no length
            _check_free_space(t.part, expected - t.offset)
        before = t.offset
        try:
            _stream(resp, t, total, settings)
        except requests.exceptions.RequestException as exc:
            attempts.after_error(exc, t.offset > before, t.offset)
            return False
        except OSError as exc:
            # Not a network error (requests' exceptions are OSErrors too, caught above):
            # the disk. Keep the partial file for a later resume.
            raise DownloadError(
                f"cannot write {t.part}: {exc}; free disk space or set {ENV_HOME} to another folder"
            ) from None
    return True


def _decide(resp: Any, t: _Transfer, attempts: _Attempts) -> Tuple[str, Optional[int]]:
    """What to do with a response, before reading its body.

    ``("stream", total)``: append the body (total = the whole file's announced size, or None);
    ``("verify", None)``: the partial file may already be whole; ``("again", None)``: the
    partial file was emptied, ask again. Raises _UrlFailed when the URL cannot deliver.
    """
    status, asset = resp.status_code, t.asset
    if status == 416 and t.offset:
        if asset.size is None or t.offset == asset.size:
            return "verify", None  # our partial may already be complete; the hash decides
        log.info("server refused range for %s; starting over", attempts.shown)
        t.restart()
        return "again", None
    if status not in (200, 206):
        hint = f" (still failing after {attempts.settings.retries} retries)" if status in RETRY_STATUSES else ""
        raise _UrlFailed(f"HTTP {status} {resp.reason or ''}".rstrip() + hint)
    total = None
    if status == 206:
        if not t.offset:
            raise _UrlFailed("server answered 206 Partial Content to a plain GET")
        start, total = _content_range(resp.headers.get("Content-Range", ""))
        if start != t.offset:
            log.info("server resumed at byte %d instead of %d; starting over", start, t.offset)
            t.restart()
            return "again", None
    elif t.offset:
        log.info("%s ignores Range requests; downloading from the start", attempts.shown)
        t.restart()
    length = resp.headers.get("Content-Length")
    if total is None and length is not None and length.isdigit():
        total = t.offset + int(length)
    if total is not None and asset.size is not None and total != asset.size:
        raise _UrlFailed(f"server says the file has {total} bytes but the manifest says {asset.size}; "
                         f"wrong file on the server or wrong size in {asset.manifest}")
    if total is not None and t.bar.total is None:
        t.bar.total = total
        t.bar.refresh()
    return "stream", total


def _stream(resp: Any, t: _Transfer, total: Optional[int], settings: DownloadSettings) -> None:
    """Append the body of ``resp`` to the partial file, hashing it as it arrives.

    Never writes past ``total`` (or, without it, the manifest's size): the chunk that would
    is refused, unwritten, with _UrlFailed. A body that trickles is abandoned too (_RateWatch).
    Network errors propagate as requests' exceptions.
    """
    import requests

    limit = total if total is not None else t.asset.size
    watch = _RateWatch(settings.read_timeout, t.offset, limit)
    t.out.seek(t.offset)
    for chunk in _body_chunks(resp):
        if limit is not None and t.offset + len(chunk) > limit:
            what = f"the announced {total}" if total is not None else f"the manifest's {limit}"
            raise _UrlFailed(f"server sent more than {what} bytes; stopped at byte {t.offset} without writing "
                             f"the excess (wrong file on the server, or a hostile one)")
        t.append(chunk)
        watch.check(t.offset)
    t.out.flush()  # the bytes reach the file; _publish syncs them once the hash has matched
    if total is not None and t.offset < total:
        raise requests.exceptions.ChunkedEncodingError(f"IncompleteRead: got {t.offset} of {total} bytes")


class _RateWatch:
    """Minimum transfer rate: at least MIN_PROGRESS bytes (or all that is left) must arrive in
    every window of ``window`` seconds (the read timeout), else the URL is abandoned.

    The socket timeout alone only bounds the wait for each byte: a server sending one byte
    every few seconds would hold the download (and its lock) for ever. Checked as bytes
    arrive, so a trickle is abandoned within two windows; silence hits the read timeout.
    """

    def __init__(self, window: float, offset: int, limit: Optional[int]) -> None:
        self.window, self.limit = window, limit
        self.start, self.offset = time.monotonic(), offset

    def check(self, offset: int) -> None:
        now = time.monotonic()
        if now - self.start < self.window:
            return
        need = MIN_PROGRESS if self.limit is None else min(MIN_PROGRESS, self.limit - self.offset)
        got = offset - self.offset
        if got < need:
            raise _UrlFailed(f"too slow: {got} bytes in {now - self.start:.1f} s, less than the {MIN_PROGRESS // 1024} "
                             f"KiB required in every {self.window:g} s (the read timeout, {ENV_TIMEOUT}); abandoned")
        self.start, self.offset = now, offset


def _body_chunks(resp: Any) -> Iterator[bytes]:
    """The body as it arrives: each read returns what the socket has (up to CHUNK), so the
    caller regains control between the bytes of a slow server. urllib3's errors are raised
    as requests' (as ``iter_content`` raises them)."""
    import requests
    from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

    try:
        while True:
            chunk = resp.raw.read1(CHUNK, decode_content=True)
            if not chunk:
                return
            yield chunk
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from None
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from None
    except ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from None
    except SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None


def _hash_matches(t: _Transfer) -> bool:
    """True when the partial file has the manifest's sha256. A stale partial from an earlier
    run is emptied (False: fetch again); wrong bytes from this URL are deleted (_Mismatch)."""
    got = t.hasher.hexdigest()
    if got == t.asset.sha256:
        return True
    if t.from_disk:
        # The partial file may be stale (another server, an old version): retry once from
        # scratch before blaming this URL.
        log.info("resumed download of %s did not verify; downloading it again from the start", t.asset.file)
        t.restart()
        return False
    size = t.offset
    t.out.truncate(0)
    _unlink_if_same(t.out, t.part)
    raise _Mismatch(f"sha256 mismatch: expected {t.asset.sha256}, got {got} ({size} bytes); the bytes were deleted")


def _unlink_if_same(out: Any, part: Path) -> None:
    # Only our own file goes: whatever else may have been put at the name stays for inspection.
    mine = os.fstat(out.fileno())
    with contextlib.suppress(OSError):
        there = os.lstat(part)
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            part.unlink()


def _check_free_space(part: Path, needed: int) -> None:
    import shutil

    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if free < needed:
        # Fail before streaming hundreds of MB into a disk that cannot hold them.
        raise DownloadError(
            f"{part.parent} has {free / 1e6:.0f} MB free but the download needs {needed / 1e6:.0f} MB more; "
            f"free some space or set {ENV_HOME} to a folder on a larger disk"
        )
