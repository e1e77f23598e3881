"""Writing files so that no reader ever sees a half-written one."""
import contextlib
import os
from pathlib import Path
from typing import IO, Iterator, Tuple, Union


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
