"""Writing files so that no reader ever sees a half-written one, opening files so that no
link, FIFO or device is ever written through by accident, and the package's one sha256 of a
file and one inter-process file lock."""
import contextlib
import errno
import hashlib
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

PathLike = Union[str, os.PathLike]

LOG = logging.getLogger(__name__)

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


# File name extensions of the images vehiclenet reads (Pillow decodes them all): the one list
# every folder walk uses (embed, rank, evaluate, finetune).
IMAGE_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
)


def is_image_path(path: PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def describe_mode(mode: int) -> str:
    """``"a regular file"``, ``"a folder"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode``."""
    for test, text in _KINDS:
        if test(mode):
            return text
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def describe_entry(path: PathLike, st: Optional[os.stat_result] = None) -> str:
    """What the directory entry ``path`` itself is (links not followed), with a link's target."""
    st = st if st is not None else os.lstat(path)
    text = describe_mode(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            text += f" to {os.readlink(path)!r}"
    return text


class NotRegularFileError(OSError):
    """:func:`open_regular` found something other than a plain regular file; ``what`` says what."""

    def __init__(self, path: PathLike, what: str) -> None:
        super().__init__(f"not a regular file, but {what}")
        self.filename = os.fspath(path)
        self.strerror = f"not a regular file, but {what}"
        self.what = what


def open_regular(path: PathLike, flags: int, mode: int = 0o666, *, follow: bool = False,
                 single_link: bool = False) -> int:
    """``os.open`` that only ever returns a descriptor of a regular file.

    Never blocks on a FIFO (O_NONBLOCK until the fstat check), never hands back a device,
    folder or socket, and unless ``follow`` never follows a symbolic link at ``path``
    (O_NOFOLLOW). ``single_link`` also refuses a file with other hard links, whose bytes
    belong to another name too. Raises :class:`NotRegularFileError` naming what is there.
    """
    extra = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        what = _refused_open(path, exc, follow)
        if what is None:
            raise
        raise NotRegularFileError(path, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, describe_mode(st.st_mode))
        if single_link and st.st_nlink != 1:
            raise NotRegularFileError(path, f"a file with {st.st_nlink - 1} other hard link(s)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refused_open(path: PathLike, exc: OSError, follow: bool) -> Optional[str]:
    # ELOOP (EMLINK on BSD) is O_NOFOLLOW meeting a link; ENXIO is a FIFO without reader or a
    # socket. Anything else (missing, permission) is an ordinary error the caller reports.
    if exc.errno not in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
        return None
    try:
        return describe_mode(os.stat(path).st_mode) if follow else describe_entry(path)
    except OSError:
        return "a symbolic link" if exc.errno in (errno.ELOOP, errno.EMLINK) else None


def _owner() -> str:
    """``<pid>@<host>``: the process a temporary name belongs to, so that a later run can tell
    the leftovers of a killed run (process gone) from the files of one still running."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:63]}"


# .<name>.<pid>@<host>.<12 hex>.partial: the private folders of this module (.tmp: files of earlier versions).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.[0-9a-f]{12}\.(?:tmp|partial)$")


def _process_gone(pid: int) -> bool:
    """True when no process ``pid`` exists on this machine (pid 0 or less: never ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user's
        return False
    return False


def remove_stale_temps(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Remove the temporary files and folders this module made in ``folder`` (for output
    ``name``, or all) whose process is gone: what a killed run (kill -9, power loss) left.

    Only names of this machine's processes are judged; a live process keeps its files.
    Returns what was removed. Never fails: a cleanup must not stop the run that does it.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = _stale_owner(entry.name, name)
        if pid is None:
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
            LOG.info("removed %s, left by an interrupted run (process %d)", entry.path, pid)
    return removed


def _stale_owner(entry: str, name: Optional[str]) -> Optional[int]:
    """The process id in a temporary name of ours (for output ``name``) whose process is gone, else None."""
    m = _TEMP_NAME.match(entry)
    if not m or m["host"] != _owner().split("@", 1)[1] or (name is not None and m["name"] != name):
        return None  # not ours, another machine's (its pids mean nothing here), or another output's
    pid = int(m["pid"])
    return pid if _process_gone(pid) else None


@contextlib.contextmanager
def private_folder(out: PathLike) -> Iterator[Path]:
    """A new folder ``.<name>.<pid>@<host>.<random>.partial`` beside ``out``, removed afterwards.

    Leftovers of killed runs for ``out`` go first. Writers get a name inside it, never a
    fixed temporary name in a shared folder, which could be a link planted by someone else.
    """
    out = Path(out)
    remove_stale_temps(out.parent, out.name)
    for _ in range(100):
        folder = out.parent / f".{out.name}.{_owner()}.{os.urandom(6).hex()}.partial"
        try:
            folder.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary folder for {out.name} in {out.parent}")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # must not hide the error that got us here


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set
    and restored at once (which another thread could see)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def settle_mode(path: PathLike, *, private: bool = False) -> None:
    """Give the finished file ``path`` the mode of every vehiclenet output: what a plain
    ``open`` gives under the umask (0666 minus it; 0777 minus it where the writer made it
    executable), whatever mode its writer chose (MindSpore writes checkpoints and MindIR
    0400). ``private`` files (the caches' native libraries and records, which
    :mod:`vehiclenet.cache_trust` refuses when group- or world-writable) never get g+w or o+w,
    whatever the umask allows."""
    st = os.lstat(path)
    want = (0o777 if st.st_mode & 0o111 else 0o666) & ~current_umask()
    if private:
        want &= ~0o022
    if stat.S_IMODE(st.st_mode) != want:
        os.chmod(path, want)


@contextlib.contextmanager
def atomic_output(path: PathLike, name: Optional[str] = None, *, private: bool = False,
                  exclusive: bool = False) -> Iterator[Path]:
    """The one way vehiclenet writes a file: no reader ever sees it half-written.

    Yields a path in a private folder beside ``path`` (file name ``name``, default
    ``path``'s own: MindSpore's writers insist on their suffix) for the writer to create.
    When the block ends normally, :func:`publish` puts that file at ``path``; on any error
    ``path`` keeps its previous content. The temporary folder goes either way, and one a
    killed run left for ``path`` goes at the start. A folder, device, FIFO or socket at
    ``path`` raises UsageError and stays as it was; a link there is replaced itself. The
    file gets the mode of :func:`settle_mode`. ``exclusive`` publishes only where nothing is
    at ``path`` yet (FileExistsError otherwise, ``path`` untouched): of writers racing to
    create one file, exactly one wins.
    """
    out = Path(path)
    _refuse_special(out, "output")  # before the temporary folder: /dev is no place for one
    out.parent.mkdir(parents=True, exist_ok=True)
    with private_folder(out) as folder:
        tmp = folder / (name or out.name)
        yield tmp
        settle_mode(tmp, private=private)
        publish(tmp, out, exclusive=exclusive)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, private: bool = False, exclusive: bool = False) -> Iterator[IO]:
    """:func:`atomic_output` for Python writers: a new file object to write ``path``'s content to."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    with atomic_output(path, private=private, exclusive=exclusive) as tmp:
        with os.fdopen(os.open(tmp, flags, 0o666), mode) as handle:
            yield handle


def create_private_file(path: PathLike, data: bytes) -> None:
    """A new file at ``path`` holding ``data``, readable by this user only (0600, e.g. a key),
    complete before anyone can see it: written in a private folder beside it, synced, then
    hard-linked into place. FileExistsError (``path`` untouched) when anything is there."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with private_folder(path) as folder:
        with os.fdopen(os.open(folder / path.name, flags, 0o600), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _link_new(folder / path.name, path, mode=0o600)
    sync_folder(path.parent)


def _link_new(tmp: PathLike, out: PathLike, mode: int = 0o666) -> None:
    """Put ``tmp``'s bytes at ``out`` only if nothing is there (FileExistsError otherwise): a hard
    link, whole at once; where the file system has no hard links (FAT, some FUSE and SMB mounts),
    a copy into a file created exclusively (a reader may then see it before it is complete)."""
    try:
        os.link(tmp, out)  # the temporary name goes with its private folder
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in {getattr(errno, n) for n in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EXDEV")
                             if hasattr(errno, n)}:
            raise
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with open(tmp, "rb") as src, os.fdopen(os.open(out, flags, mode), "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())


def publish(tmp: PathLike, out: PathLike, fd: Optional[int] = None, *, exclusive: bool = False) -> None:
    """Put the finished file ``tmp`` at ``out`` in one rename, durably: its bytes are synced
    (through ``fd`` when the writer holds it open) before the rename, the folder after it.
    ``exclusive``: a hard link instead of the rename, which fails (FileExistsError) where
    anything is at ``out`` already.

    Without the first sync a crash soon after could leave ``out`` empty on some file
    systems; without the second, the rename itself could be lost.
    """
    if fd is not None:
        os.fsync(fd)
    else:
        own = open_regular(tmp, os.O_RDONLY)
        try:
            os.fsync(own)
        finally:
            os.close(own)
    if exclusive:
        _link_new(tmp, out)
    else:
        replace_output(tmp, out)
    sync_folder(Path(out).parent)


def sync_folder(folder: PathLike) -> None:
    """fsync a folder, so a rename in it survives a crash (best effort: not every system can)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_output(tmp: PathLike, out: PathLike) -> None:
    """``os.replace(tmp, out)`` unless ``out`` is a folder, device, FIFO or socket (UsageError).

    Checked at the last moment too, as it may have appeared while the output was being
    made: the rename would turn a device or FIFO into a regular file. A link at ``out``
    is replaced itself; what it points to is not touched.
    """
    _refuse_special(Path(out), "output")
    os.replace(tmp, out)


def _refuse_special(path: Path, option: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISLNK(mode):  # a link is replaced itself; what it points to is not touched
        _refuse_special_mode(os.fspath(path), option, mode)


def check_output_file(path: PathLike, option: str, inputs: Iterable[PathLike] = (),
                      accept: Optional[Callable[[str], bool]] = None, *,
                      owned: Iterable[PathLike] = ()) -> None:
    """Refuse, before any work is done, an output file that cannot or must not be replaced.

    Refused with a UsageError naming ``option``: a folder, a device, FIFO or socket (also
    behind a link), a path below a file, and any of the command's ``inputs`` (the same
    file by device and inode, so also through links and hard links). A folder among
    ``inputs`` stands for the files in it that ``accept`` (a file name test) takes.
    ``owned`` are input folders every file of which belongs to the input (a folder of
    feature chunks): no output goes anywhere inside them.
    """
    from .errors import UsageError

    name = os.fspath(path)
    target = Path(path).absolute()
    folder = inside_folder(target, owned)
    if folder is not None:
        raise UsageError(f"{option} {name!r} is inside the input folder {folder!r}, whose files all belong to it "
                         f"(its manifest and chunks): give {option} a path outside that folder")
    try:
        st = target.stat()  # follows links: a link to a device is a device for our purpose
    except OSError:
        st = None
    if st is not None:
        _refuse_special_mode(name, option, st.st_mode)
        clash = same_file_among(st, inputs, accept)
        if clash is not None:
            raise UsageError(f"{option} {name!r} is the command's own input {clash!r} (the same file); writing it "
                             f"would replace that input: give {option} a path of its own")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {name!r}: {str(parent)!r} is a file, not a folder")


def inside_folder(path: PathLike, folders: Iterable[PathLike]) -> Optional[str]:
    """The first of ``folders`` that ``path`` is inside of (or is), with the links of its folders
    resolved (a link at ``path`` itself is replaced by a writer, never written through); else None."""
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    for folder in folders:
        top = os.path.realpath(folder)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return os.fspath(folder)
    return None


def _refuse_special_mode(name: str, option: str, mode: int) -> None:
    from .errors import UsageError

    if stat.S_ISDIR(mode):
        raise UsageError(f"{option} {name!r} is a folder: give a file name")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{option} {name!r} is {describe_mode(mode)}, not a regular file; vehiclenet replaces "
                         "its outputs with a new file, which must not happen to a device or pipe: give the path "
                         "of a regular file")


def same_file_among(st: os.stat_result, inputs: Iterable[PathLike],
                    accept: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """The first of ``inputs`` that is the file ``st`` describes (same device and inode), or None.

    Links are followed; a folder is searched recursively for files whose name ``accept``
    takes (all when None), each real folder once, so link loops end.
    """
    key = (st.st_dev, st.st_ino)
    seen: Set[Tuple[int, int]] = set()
    for item in inputs:
        name = os.fspath(item)
        try:
            found = os.stat(name)
        except OSError:
            continue  # a missing input is the command's own error to report
        if stat.S_ISDIR(found.st_mode):
            hit = _find_in_folder(name, key, accept, seen)
            if hit is not None:
                return hit
        elif (found.st_dev, found.st_ino) == key:
            return name
    return None


def _find_in_folder(folder: str, key: Tuple[int, int], accept: Optional[Callable[[str], bool]],
                    seen: Set[Tuple[int, int]]) -> Optional[str]:
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            st = os.stat(current)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                est = entry.stat()  # follows links, as the commands' folder walks do
            except OSError:
                continue
            if stat.S_ISDIR(est.st_mode):
                stack.append(entry.path)
            elif (est.st_dev, est.st_ino) == key and (accept is None or accept(entry.name)):
                return entry.path
    return None


# A member of a .npz may inflate this many times its stored size (plus the allowance below):
# float features barely compress, while names do, up to ~20x; a zip bomb inflates ~1000x.
NPZ_MAX_RATIO = 64
NPZ_RATIO_ALLOWANCE = 256 << 20


def read_npz(path: Union[str, os.PathLike], keys: Sequence[str], what: str, remedy: str, *,
             data: Optional[bytes] = None) -> Dict[str, Any]:
    """All arrays of the ``.npz`` at ``path`` (or of its bytes ``data``, already read), which
    must hold ``keys``.

    Any way the file can be unusable (missing, a FIFO or device, a plain ``.npy``, truncated,
    damaged, keys missing, arrays larger than the file can hold, a member inflating beyond
    :data:`NPZ_MAX_RATIO`) is a DataError naming the file, ``what`` it should be and
    ``remedy``; sizes are checked before anything is allocated.
    """
    import io
    import zipfile
    import zlib

    import numpy as np

    from .errors import DataError

    name = os.fspath(path)
    try:
        source = io.BytesIO(data) if data is not None else open(open_regular(name, os.O_RDONLY, follow=True), "rb")
        with source:
            if not zipfile.is_zipfile(source):
                source.seek(0)
                if source.read(6) == b"\x93NUMPY":
                    raise DataError(f"{name}: a single-array .npy file, not {what} (keys {', '.join(keys)}); {remedy}")
                raise zipfile.BadZipFile("not a zip archive")
            source.seek(0)
            _check_npz_sizes(source, name, what, remedy)
            source.seek(0)
            with np.load(source, allow_pickle=False) as npz:
                missing = [k for k in keys if k not in npz.files]
                if missing:
                    raise DataError(f"{name}: missing key(s) {', '.join(missing)}; {what} holds {', '.join(keys)}")
                return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{name}: no such features file (it does not exist)") from None
    except NotRegularFileError as exc:
        raise DataError(f"{name}: {exc.strerror}, not {what}; give the path of a regular file") from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as exc:
        # BadZipFile/zlib.error: a truncated or damaged .npz (e.g. an interrupted copy);
        # NotImplementedError/RuntimeError: a member compressed by an unknown method or encrypted.
        raise DataError(f"{name}: damaged or not {what} ({type(exc).__name__}: {exc}); {remedy}") from None


def _check_npz_sizes(source: IO[bytes], name: str, what: str, remedy: str) -> None:
    """Refuse a .npz whose members inflate beyond :data:`NPZ_MAX_RATIO` or whose arrays declare
    more bytes than their member holds (numpy would allocate what the header declares)."""
    import zipfile

    import numpy as np

    from .errors import DataError

    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            if info.file_size > NPZ_MAX_RATIO * info.compress_size + NPZ_RATIO_ALLOWANCE:
                raise DataError(f"{name}: member {info.filename!r} would inflate from {info.compress_size} to "
                                f"{info.file_size} bytes, more than {what} can hold; {remedy}")
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise DataError(f"{name}: array {info.filename[:-4]!r} has .npy format {version}, which numpy "
                                    f"writes only for structured arrays: not {what}; {remedy}")
                shape, _, dtype = reader(member)
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size:
                raise DataError(f"{name}: array {info.filename[:-4]!r} declares shape {shape} ({declared} bytes), "
                                f"more than its {info.file_size} stored bytes: damaged or not {what}; {remedy}")


# --------------------------------------------------------------------------- hashing and locking

HASH_BUFFER = 1 << 22  # file hashing buffer: 4 MiB (fewer syscalls than hashlib's 256 KiB)


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a regular file (links followed), streamed with a large buffer.

    A FIFO or device raises :class:`NotRegularFileError` (an OSError) at once instead of
    blocking or reading forever.
    """
    fd = open_regular(path, os.O_RDONLY, follow=True)
    with open(fd, "rb", buffering=0) as f:
        return hash_stream(f).hexdigest()


def hash_stream(f: Any) -> "hashlib._Hash":
    """SHA-256 of a binary file object (``readinto``) from its current position to the end."""
    digest = hashlib.sha256()
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    # readinto a reused buffer: no per-chunk allocation; hashlib releases the GIL. The buffer is
    # mapped memory, not malloc's: freeing a 4 MiB malloc block raises glibc's mmap threshold to
    # 4 MiB, after which the process's later allocations stay in its heap (+38 MB peak RSS
    # measured for `vehiclenet embed` after hashing a 0.25 MB kernel library).
    with mmap.mmap(-1, HASH_BUFFER) as buf:
        view = memoryview(buf)
        try:
            readinto, update = f.readinto, digest.update
            while True:
                n = readinto(view)
                if not n:
                    break
                update(view[:n])
        finally:
            view.release()
    return digest


class LockFileError(OSError):
    """A lock file or its folder cannot be used (not a regular file, a link, no permission)."""


@contextlib.contextmanager
def file_lock(lock_file: PathLike, timeout: float) -> Iterator[None]:
    """An exclusive flock on ``lock_file``, waiting up to ``timeout`` s (TimeoutError after):
    the one inter-process lock of the package (downloads, kernel builds, compiled graphs).

    Not filelock's: that opens the lock with O_TRUNC and follows links, so a link planted
    at the lock's name would truncate its target. Here the lock folder is opened without
    following links, and the lock file inside it read-only, O_NOFOLLOW, never truncated.
    Raises :class:`LockFileError` when the lock cannot be opened.
    """
    lock_file = Path(lock_file)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; filelock's msvcrt lock has no such problem there
        import filelock

        try:
            with filelock.FileLock(str(lock_file), timeout=timeout):
                yield
        except filelock.Timeout:
            raise TimeoutError(lock_file) from None
        return
    fd = _open_lock_file(lock_file)
    try:
        _flock_until(fd, time.monotonic() + timeout, lock_file)
        yield
    finally:
        os.close(fd)  # releases the lock


# flock errors that mean "this file system does not lock" (NFS emulates flock with byte-range
# locks, which refuse an exclusive lock on a read-only descriptor): the update goes on unlocked.
_NO_LOCKS = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "EBADF", "EINVAL", "ENOSYS")
             if hasattr(errno, name)}


def _open_for_lock(path: PathLike) -> int:
    """The file opened read-write where allowed (NFS's flock needs it for an exclusive lock),
    else read-only."""
    try:
        return open_regular(path, os.O_RDWR, follow=True)
    except PermissionError:
        return open_regular(path, os.O_RDONLY, follow=True)


def _flock_until(fd: int, deadline: float, what: Any) -> None:
    """Take an exclusive flock on ``fd``, polling until ``deadline`` (TimeoutError(``what``) after)."""
    import fcntl

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(what) from None
            time.sleep(0.05)


@contextlib.contextmanager
def locked_for_update(path: PathLike, timeout: float,
                      on_error: Optional[Callable[[PathLike], Any]] = None) -> Iterator[None]:
    """An exclusive flock on the file ``path`` itself for a read-modify-write that ends by
    replacing it (:func:`atomic_output`), so no other such update of it is lost.

    Leaves no lock file behind. A writer that replaced ``path`` while this one waited locked
    the old file: the lock is taken again on the file now at ``path``. Waits up to
    ``timeout`` s (TimeoutError after); the file must exist and be a regular one: where it
    cannot be opened, ``on_error(path)`` (the reader, with its own message) runs first.
    """
    if os.name != "posix":  # no flock; a replace there fails while another process has the file open
        yield
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = _open_for_lock(path)
        except OSError:
            if on_error is not None:
                on_error(path)
            raise
        try:
            try:
                _flock_until(fd, deadline, f"{path}: another process is updating it")
            except OSError as exc:
                if isinstance(exc, TimeoutError) or exc.errno not in _NO_LOCKS:
                    raise
                LOG.warning("cannot lock %s (%s, e.g. a network file system without locks): another update "
                            "at the same time could lose this one's rows", path, exc.strerror or exc)
                yield
                return
            here = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (here.st_dev, here.st_ino):
                yield
                return
        finally:
            os.close(fd)  # releases the lock


def _open_lock_file(lock_file: Path) -> int:
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # Through a descriptor of the folder: a link swapped in for the folder cannot redirect us.
        folder_fd = os.open(lock_file.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
    except OSError as exc:
        raise LockFileError(f"cannot use the lock folder {lock_file.parent}: {exc.strerror or exc}; "
                            f"remove it if it is not a folder, then run the command again") from None
    try:
        fd = os.open(lock_file.name, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | nofollow, 0o666, dir_fd=folder_fd)
    except OSError as exc:
        raise LockFileError(f"cannot open the lock file {lock_file}: {exc.strerror or exc}; "
                            f"remove it if it is not a regular file, then run the command again") from None
    finally:
        os.close(folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockFileError(f"the lock file {lock_file} is not a regular file; remove it, then run the command again")
    return fd
