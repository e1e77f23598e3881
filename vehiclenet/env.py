"""Every ``VEHICLENET_*`` environment variable: declared once here, and read nowhere else.

Each variable has a name, a default written as a user would write the value (parsed by the
same rules), a one-line meaning and a parser. The accessors read the environment at every
call, so a value set between two calls of one process (tests, notebooks) takes effect. A
value that cannot be understood raises :class:`~vehiclenet.errors.UsageError` naming the
variable. docs/caches.md's table of variables is :func:`markdown_table` (a test checks it is current).
"""
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import UsageError

HOME = "VEHICLENET_HOME"
KERNEL_CACHE = "VEHICLENET_KERNEL_CACHE"
ASSETS = "VEHICLENET_ASSETS"
MIRROR = "VEHICLENET_MIRROR"
OFFLINE = "VEHICLENET_OFFLINE"
TIMEOUT = "VEHICLENET_TIMEOUT"
RETRIES = "VEHICLENET_RETRIES"
BACKOFF = "VEHICLENET_BACKOFF"
LOCK_TIMEOUT = "VEHICLENET_LOCK_TIMEOUT"
MAX_PIXELS = "VEHICLENET_MAX_PIXELS"
CPU_KERNELS = "VEHICLENET_CPU_KERNELS"
COMPILE_CACHE = "VEHICLENET_COMPILE_CACHE"

KERNEL_FOLDER = "kernels"  # the compiled libraries' sub-folder of the cache root
COMPILED_FOLDER = "compiled"  # the compiled graphs' sub-folder (vehiclenet/model/compile_cache.py)

_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- parsers


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise UsageError(f"{name}={raw!r} is not understood; use 1 or 0")


def _whole(minimum: int, maximum: Optional[int] = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            result = int(raw.strip())  # int() accepts "_" separators: 40_000_000
        except ValueError:
            raise UsageError(f"{name}={raw.strip()!r} is not a whole number") from None
        if result < minimum:
            raise UsageError(f"{name}={raw.strip()!r} must be at least {minimum}")
        if maximum is not None and result > maximum:
            raise UsageError(f"{name}={raw.strip()!r} must be at most {maximum}")
        return result

    return parse


def _seconds(name: str, raw: str) -> float:
    try:
        result = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of seconds") from None
    if result < 0:
        raise UsageError(f"{name}={raw!r} must not be negative")
    return result


def _timeouts(name: str, raw: str) -> Tuple[float, float]:
    """``READ`` or ``CONNECT,READ`` seconds; a lone READ keeps the default connect timeout
    (or READ, when shorter)."""
    try:
        parts = [float(p) for p in raw.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return min(default(TIMEOUT)[0], parts[0]), parts[0]
    if len(parts) == 2 and min(parts) > 0:
        return parts[0], parts[1]
    raise UsageError(f"{name}={raw!r}: give READ or CONNECT,READ in seconds, e.g. 10,60")


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Variable:
    """One environment variable: ``default`` is written as a user would set it ("" = none,
    then ``unset`` says what happens), ``meaning`` is its line in the table of docs/caches.md."""

    name: str
    default: str
    meaning: str
    parse: Callable[[str, str], Any]
    unset: str = ""

    def value(self) -> Any:
        """The parsed value now: the environment's, else the default's (None without one)."""
        raw = os.environ.get(self.name, "")
        if raw.strip():
            return self.parse(self.name, raw)
        return self.parse(self.name, self.default) if self.default else None


VARIABLES: Dict[str, Variable] = {v.name: v for v in (
    Variable(HOME, "", "cache root: verified assets, the compiled kernels in its `kernels/` folder and "
             "compiled graphs in `compiled/`", _path,
             unset="the platform's user cache folder (`~/.cache/vehiclenet` on Linux)"),
    Variable(KERNEL_CACHE, "", "folder of the compiled oneDNN and retrieval kernel libraries", _path,
             unset="`kernels/` in the cache root"),
    Variable(ASSETS, "", "path of another manifest (private models)", _path, unset="the packaged `assets.json`"),
    Variable(MIRROR, "", "base URL tried first, as `<mirror>/<file>`", _text, unset="none"),
    Variable(OFFLINE, "0", "1: never touch the network; the cache, or a message saying where to put the file",
             _flag),
    Variable(TIMEOUT, "10,60", "connect and read timeouts in seconds, `READ` or `CONNECT,READ`", _timeouts),
    Variable(RETRIES, "4", "retries per URL after a connection error, a timeout, 429 or 5xx (at most 100)",
             _whole(0, 100)),
    Variable(BACKOFF, "0.5", "seconds of the first wait between retries (doubling after each)", _seconds),
    Variable(LOCK_TIMEOUT, "3600", "seconds to wait for another process downloading the same asset", _seconds),
    Variable(MAX_PIXELS, "40000000", "largest image decoded at full size; larger JPEGs are decoded at reduced "
             "scale, other formats refused (see docs/safety.md)", _whole(1)),
    Variable(CPU_KERNELS, "1", "0: MindSpore's own CPU operators instead of the oneDNN kernels", _flag),
    Variable(COMPILE_CACHE, "1", "0: compile the inference and training graphs in every process instead of "
             "keeping them in `compiled/` of the cache root", _flag),
)}


def value(name: str) -> Any:
    """The parsed value of the declared variable ``name`` (KeyError for an undeclared one)."""
    return VARIABLES[name].value()


def default(name: str) -> Any:
    """The parsed default of ``name`` (None when it has none)."""
    var = VARIABLES[name]
    return var.parse(name, var.default) if var.default else None


def is_set(name: str) -> bool:
    """Whether the declared variable ``name`` is set to something other than blanks."""
    return bool(os.environ.get(VARIABLES[name].name, "").strip())


def shown(name: str) -> str:
    """``NAME=value`` as set, for messages that say which setting decided something."""
    return f"{name}={os.environ.get(VARIABLES[name].name, '')}"


# --------------------------------------------------------------------------- typed accessors


def cache_dir() -> Path:
    """Cache root: ``$VEHICLENET_HOME``, else the platform's user cache folder."""
    home = value(HOME)
    return home if home is not None else user_cache_dir()


def user_cache_dir() -> Path:
    """The platform's per-user cache folder for vehiclenet (``~/.cache/vehiclenet`` on Linux):
    the cache root without ``$VEHICLENET_HOME``, and where compiled code goes when the
    configured folders may not hold it (:mod:`vehiclenet.cache_trust`)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("vehiclenet", appauthor=False))


def kernel_dir() -> Path:
    """Where compiled libraries are kept: ``$VEHICLENET_KERNEL_CACHE``, else ``kernels/`` of the cache root."""
    folder = value(KERNEL_CACHE)
    return folder if folder is not None else cache_dir() / KERNEL_FOLDER


def kernel_root() -> Path:
    """The cache root :func:`kernel_dir` lies in: ``$VEHICLENET_KERNEL_CACHE`` is its own root."""
    folder = value(KERNEL_CACHE)
    return folder if folder is not None else cache_dir()


def mirror() -> str:
    """``$VEHICLENET_MIRROR`` ("" when unset)."""
    return value(MIRROR) or ""


# The other accessors only type what the variable's parser returns (meanings: VARIABLES).
manifest_override: Callable[[], Optional[Path]] = functools.partial(value, ASSETS)  # None: the packaged one
offline: Callable[[], bool] = functools.partial(value, OFFLINE)
timeouts: Callable[[], Tuple[float, float]] = functools.partial(value, TIMEOUT)  # (connect, read) seconds
retries: Callable[[], int] = functools.partial(value, RETRIES)
backoff: Callable[[], float] = functools.partial(value, BACKOFF)
lock_timeout: Callable[[], float] = functools.partial(value, LOCK_TIMEOUT)
max_pixels: Callable[[], int] = functools.partial(value, MAX_PIXELS)
cpu_kernels: Callable[[], bool] = functools.partial(value, CPU_KERNELS)
compile_cache: Callable[[], bool] = functools.partial(value, COMPILE_CACHE)


# --------------------------------------------------------------------------- launcher variables
# Not ours: MindSpore's launcher msrun exports these to the processes it starts (2.8.0 sets
# MS_ROLE, MS_WORKER_NUM, MS_NODE_ID, MS_SCHED_HOST/PORT, RANK_ID, RANK_SIZE, DEVICE_ID).
# Read here, never set. The rank is MS_NODE_ID, not RANK_ID: msrun sets RANK_ID=0 in its own
# environment for the scheduler and every worker it starts afterwards inherits that when msrun
# does not know the worker's rank (several machines without --node_rank: the rank is assigned
# later, inside mindspore.communication.init()); MS_NODE_ID is set only when the rank is known.
MS_ROLE = "MS_ROLE"
MS_NODE_ID = "MS_NODE_ID"
MS_WORKER_NUM = "MS_WORKER_NUM"


def msrun_scheduler() -> bool:
    """Whether this process is msrun's scheduler (``MS_ROLE=MS_SCHED``): msrun starts the
    user's command once more for it, besides the workers. Its job is the rendezvous of
    ``mindspore.communication.init()``; a command whose workers never call ``init()`` must do
    nothing in it, or it would run the whole job a further time."""
    return os.environ.get(MS_ROLE, "").strip() == "MS_SCHED"


def launcher_rank() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process as msrun started it; ``(0, 1)`` outside msrun.

    Only a worker of msrun (``MS_ROLE=MS_WORKER``) reads ``MS_NODE_ID`` and ``MS_WORKER_NUM``.

    Raises:
        UsageError: a worker of msrun whose rank msrun did not know when it started it
            (several machines without ``--node_rank``), or values that are not a rank below
            the world size.
    """
    if os.environ.get(MS_ROLE, "").strip() != "MS_WORKER":
        return 0, 1
    rank_raw, size_raw = os.environ.get(MS_NODE_ID, "").strip(), os.environ.get(MS_WORKER_NUM, "").strip()
    if not rank_raw or not size_raw:
        raise UsageError(f"this process runs under msrun ({MS_ROLE}=MS_WORKER) but {MS_NODE_ID} or {MS_WORKER_NUM} "
                         "is not set: on several machines give msrun --node_rank=<machine index> so that each "
                         "worker knows its rank when it starts")
    size = _whole(1)(MS_WORKER_NUM, size_raw)
    rank = _whole(0)(MS_NODE_ID, rank_raw)
    if rank >= size:
        raise UsageError(f"{MS_NODE_ID}={rank} is not below {MS_WORKER_NUM}={size}")
    return rank, size


def check_all() -> None:
    """Parse every declared variable now (UsageError for the first bad one), so a command
    reports a bad setting before it does any work, not when it first needs the value."""
    for var in VARIABLES.values():
        var.value()


def markdown_table() -> str:
    """docs/caches.md's table of the variables, one row each with its default and meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var in VARIABLES.values():
        shown_default = f"`{var.default}`" if var.default else var.unset
        rows.append(f"| `{var.name}` | {shown_default} | {var.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m vehiclenet.env > table.md: the table of docs/caches.md
    print(markdown_table(), end="")
