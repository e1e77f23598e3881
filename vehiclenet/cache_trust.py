"""Which cache folders may hold code this process runs.

The compiled kernel libraries (``kernels/``) are loaded with ``dlopen``, which runs their
constructors as the calling user, and MindSpore's compiled graphs (``compiled/``) name the
libraries their custom operators load. So a folder someone else can write is never loaded
from. The rule is the one OpenSSH applies to key files and pip to its cache:

- the cache root and every folder below it down to the one holding the code, and each file
  loaded from it: owned by this user or root, writable by no one else (no group or world
  write bit), and no symbolic link below the root;
- every folder above the cache root: owned by this user or root, and writable by others
  only with the sticky bit (``/tmp``), so that nobody else can rename the cache root away;
- the root's path is resolved once and the resolved path used from then on;
- folders created here are 0700.

A refused folder is named in one warning with its fix and what happens instead (the user's
own cache folder, or running without the compiled code); nothing in it is read. A library
also carries ``<file>.sha256``, written by the process that compiled it and checked before
every load. Windows has no POSIX ownership: there the rule is not applied.
"""
import logging
import os
import stat
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

LOG = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"
_MAX_DIGEST_BYTES = 4096  # a sidecar is one line; anything longer is not ours
_warned: Set[str] = set()  # one warning per refusal and process

HINT = "point VEHICLENET_HOME at a folder only you can write"
Candidate = Tuple[Path, Path]  # (folder that would hold the code, the cache root it lies in)


class UntrustedFolder(Exception):
    """A cache folder (or a folder above it) fails the rule; the message names it and the fix."""

    def __init__(self, folder: Path, component: Path, problem: str, fix: str) -> None:
        super().__init__(f"{component} {problem}; {fix}")
        self.folder, self.component, self.problem, self.fix = folder, component, problem, fix


def enforced() -> bool:
    """Whether the ownership rule applies here (POSIX systems)."""
    return os.name == "posix"


def _who(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _owner_problem(st: os.stat_result, uid: int) -> Optional[str]:
    if st.st_uid in (uid, 0):
        return None
    return f"is owned by {_who(st.st_uid)}, not by you ({_who(uid)}) or root"


def _strict_problem(st: os.stat_result, uid: int) -> Optional[str]:
    """The rule for the cache root, what is below it and the files loaded: owned, no one else writes."""
    owner = _owner_problem(st, uid)
    if owner:
        return owner
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _ancestor_problem(st: os.stat_result, uid: int) -> Optional[str]:
    """The rule above the cache root: owned, and writable by others only with the sticky bit."""
    owner = _owner_problem(st, uid)
    if owner:
        return owner
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by others without the sticky bit (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _fix(component: Path, problem: str, hint: str) -> str:
    if problem.startswith("is owned by"):
        return hint
    if problem.startswith("is writable by others without"):
        return f"`chmod o-w,g-w {component}` or `chmod +t {component}`, or {hint}"
    if problem.startswith("is writable by others"):
        return f"check what it holds, then `chmod go-w {component}`, or {hint}"
    return f"replace it with a folder, or {hint}"


def private_folder(folder: Path, root: Path, *, create: bool = True, uid: Optional[int] = None,
                   hint: str = HINT) -> Path:
    """``folder`` (which lies in the cache ``root``, or is its own root) resolved, after checking
    every folder from ``/`` down to it; missing ones are created 0700 with ``create``.

    Raises:
        UntrustedFolder: a folder on the way fails the rule (module docstring).
        OSError: a missing folder cannot be created.
    """
    folder, root = Path(folder), Path(root)
    if not enforced():
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder
    uid = os.geteuid() if uid is None else uid
    try:
        below = folder.relative_to(root).parts
    except ValueError:
        root, below = folder, ()
    real_root = Path(os.path.realpath(root))
    path = Path(real_root.anchor)
    steps = [(part, False) for part in real_root.parts[1:]] + [(part, True) for part in below]
    for depth, (part, strict_link) in enumerate(steps):
        path = path / part
        is_root_or_below = depth >= len(real_root.parts) - 2
        st = _existing(path, create)
        if st is None:  # not there yet (nor what is below): nothing in it to trust or refuse
            return path.joinpath(*(p for p, _ in steps[depth + 1:]))
        if stat.S_ISLNK(st.st_mode) and strict_link:
            _refuse(folder, path, f"is a symbolic link (to {os.readlink(path)!r}), which the cache never follows",
                    hint)
        if not stat.S_ISDIR(st.st_mode):
            _refuse(folder, path, "is not a folder", hint)
        problem = (_strict_problem if is_root_or_below else _ancestor_problem)(st, uid)
        if problem:
            _refuse(folder, path, problem, hint)
    return path


def _existing(path: Path, create: bool) -> Optional[os.stat_result]:
    """lstat of ``path``, creating it (0700) first when missing and ``create``; None if missing."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made meanwhile, by us or someone else: checked like any other
    return os.lstat(path)


def _refuse(folder: Path, component: Path, problem: str, hint: str) -> None:
    raise UntrustedFolder(folder, component, problem, _fix(component, problem, hint))


def first_trusted(candidates: Sequence[Candidate], what: str, otherwise: str, *, create: bool = True,
                  hint: str = HINT) -> Tuple[Optional[Path], int]:
    """The first of ``candidates`` that passes the rule, resolved (created 0700 with
    ``create``), and its position; ``(None, len(candidates))`` when none does.

    Each one refused, or that cannot be created, is named in one warning per process that
    says what happens instead: the next candidate, or ``otherwise``.
    """
    passed_over: List[Tuple[Path, str]] = []
    for index, (folder, root) in enumerate(candidates):
        try:
            chosen = private_folder(folder, root, create=create, hint=hint)
        except UntrustedFolder as exc:
            passed_over.append((folder, f"not loading {what} from {folder}: {exc}"))
            continue
        except OSError as exc:
            passed_over.append((folder, f"cannot keep {what} in {folder}: {exc.strerror or exc}"))
            continue
        _warn(passed_over, f"using {chosen} instead")
        return chosen, index
    _warn(passed_over, otherwise)
    return None, len(candidates)


def _warn(passed_over: Sequence[Tuple[Path, str]], instead: str) -> None:
    for folder, message in passed_over:
        if message not in _warned:
            _warned.add(message)
            LOG.warning("%s. %s", message, instead[0].upper() + instead[1:])


def file_problem(path: Path, uid: Optional[int] = None) -> Optional[str]:
    """Why the file ``path`` must not be loaded (missing, not a regular file, or failing the
    rule), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it does not exist"
    if not stat.S_ISREG(st.st_mode):
        from .fileio import describe_entry

        return f"it is {describe_entry(path, st)}, not a regular file"
    if not enforced():
        return None
    problem = _strict_problem(st, os.geteuid() if uid is None else uid)
    return f"it {problem}" if problem else None


def digest_file(library: Path) -> Path:
    """The sidecar holding ``library``'s sha256, as its compiling process wrote it."""
    return library.with_name(library.name + DIGEST_SUFFIX)


def write_digest(library: Path, digest: str) -> None:
    """Record ``digest`` (the sha256 of the bytes just compiled) beside ``library``, atomically,
    in the ``sha256sum -c`` format."""
    from .fileio import atomic_write

    with atomic_write(digest_file(library), "w", private=True) as f:
        f.write(f"{digest}  {library.name}\n")


def library_problem(library: Path) -> Optional[str]:
    """Why ``library`` must not be loaded: the file or its sidecar fails the rule, the
    sidecar is missing or not ours, or the bytes do not match it. None when it may be."""
    from .fileio import open_regular, sha256_file

    for path in (library, digest_file(library)):
        problem = file_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    try:
        fd = open_regular(digest_file(library), os.O_RDONLY)
        with open(fd, "rb") as f:
            text = f.read(_MAX_DIGEST_BYTES + 1)
    except OSError as exc:
        return f"{digest_file(library).name}: {exc.strerror or exc}"
    fields = text.decode("ascii", "replace").split()
    if len(text) > _MAX_DIGEST_BYTES or len(fields) != 2 or fields[1] != library.name or len(fields[0]) != 64:
        return f"{digest_file(library).name} is not the checksum line its build writes"
    got = sha256_file(library)
    if got != fields[0].lower():
        return f"its sha256 is {got}, its build recorded {fields[0]}"
    return None
