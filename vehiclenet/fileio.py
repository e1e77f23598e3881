"""Writing files so that no reader ever sees a half-written one."""
import contextlib
import os
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Sequence, Tuple, Union


def _create_temp(folder: Path, name: str) -> Tuple[int, Path]:
    """Create a new empty file ``.<name>.<random>.tmp`` in ``folder``; return its fd and path.

    Not tempfile.mkstemp: that creates mode 0600, which the rename would carry over to
    the user's output. Opening with 0666 lets the kernel apply the umask (and any
    default ACL), exactly as for a file written with ``open(path, "w")``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}")


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    The new file gets the mode a plain ``open`` would give it (0666 minus the umask).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(out.parent, out.name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: Union[str, os.PathLike], option: str) -> None:
    """Refuse an output file that cannot be created (a folder by that name, a file where one of
    its folders should be) before any work is done; ``option`` names it in the error."""
    from .errors import UsageError

    target = Path(path).absolute()
    if target.is_dir():
        raise UsageError(f"{option} {os.fspath(path)!r} is a folder: give a file name")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {os.fspath(path)!r}: {str(parent)!r} is a file, not a folder")


def read_npz(path: Union[str, os.PathLike], keys: Sequence[str], what: str, remedy: str) -> Dict[str, Any]:
    """All arrays of the ``.npz`` at ``path``, which must hold ``keys``.

    Any way the file can be unusable (missing, a plain ``.npy``, truncated, damaged,
    keys missing) is a DataError naming the file, ``what`` it should be and ``remedy``.
    """
    import zipfile
    import zlib

    import numpy as np

    from .errors import DataError

    name = os.fspath(path)
    try:
        loaded = np.load(name, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # np.load returns a bare array for a .npy file
            raise DataError(f"{name}: a single-array .npy file, not {what} (keys {', '.join(keys)}); {remedy}")
        with loaded as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{name}: missing key(s) {', '.join(missing)}; {what} holds {', '.join(keys)}")
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{name}: no such features file (it does not exist)") from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # BadZipFile/zlib.error: a truncated or damaged .npz (e.g. an interrupted copy).
        raise DataError(f"{name}: damaged or not {what} ({type(exc).__name__}: {exc}); {remedy}") from None
