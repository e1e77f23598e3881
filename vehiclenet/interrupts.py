"""Ctrl-C and SIGTERM for the command line: one line, exit 130 (143), never inside MindSpore.

Python's own handling is not enough next to MindSpore:

- MindSpore registers a SIGINT handler of its own at every graph run that sends the process
  SIGTERM (``kill(getpid(), SIGTERM)``): Ctrl-C killed the process with exit 143, no message
  and its temporary files left behind.
- A KeyboardInterrupt raised while ``import mindspore`` runs can abort the interpreter
  ("Fatal Python error: PyThreadState_Get"); raised while MindSpore compiles a graph (it calls
  back into Python) it prints ~70 lines and writes ``rank_0/om/analyze_fail.ir``.

So :func:`handling` (the CLI's ``main``) blocks SIGTERM in every thread and waits for it in a
thread of its own: a SIGTERM the process sent itself is MindSpore's translation of a SIGINT
and is passed on as SIGINT, any other as SIGTERM. Both reach the main thread as a Python
signal. Inside :func:`held` (importing MindSpore, building, compiling and running the
network, saving) a signal is kept until the section ends and raised there as
:class:`Interrupted`; elsewhere at once. Commands say what they are doing (:func:`doing`) and
what an interruption would leave (:func:`kept`) to the :class:`Progress` that
:func:`handling` installs, for the one line :func:`report` prints.

Outside :func:`handling` (the library used from Python) signals are left as they are and
nothing is recorded (no :class:`Progress` is installed); :func:`import_mindspore` still blocks
SIGINT until the import is complete.
"""
import contextlib
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Iterator, Optional

LOG = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``activity`` is what the command was doing when it did."""

    def __init__(self, signum: int, activity: str) -> None:
        super().__init__(activity)
        self.signum = signum
        self.activity = activity


class Progress:
    """What the command does now and what an interruption would leave: the one line of
    :func:`report`. :func:`handling` installs one for the command it runs."""

    def __init__(self) -> None:
        self.activity = "starting"
        self.kept = "nothing was written"


class _State:
    progress: Optional[Progress] = None  # installed by handling(): the command line's
    depth = 0  # nesting of held() sections
    pending: Optional[Interrupted] = None
    watcher: Optional[threading.Thread] = None
    forwarded: Optional[int] = None  # Python 3.9: the signal a simulated SIGINT stands for


_state = _State()
_FORWARDS_SIGNUM = sys.version_info >= (3, 10)  # _thread.interrupt_main(signum)


def doing(activity: str) -> None:
    """Say what the command does now ("embedding images (32 of 200 done)"); logged (debug) when
    it changes. Nothing without an installed :class:`Progress`."""
    progress = _state.progress
    if progress is None:
        return
    changed, progress.activity = activity != progress.activity, activity
    if changed:  # after the change: a signal can arrive while this line is written
        LOG.debug("now %s", activity)


def activity() -> str:
    """What the command said it does now (see :func:`doing`): errors without a file name name it."""
    return _state.progress.activity if _state.progress is not None else "running"


def kept(note: str) -> None:
    """Say what an interruption from now on leaves behind ("kept out/vehiclenet-e002.ckpt")."""
    if _state.progress is not None:
        _state.progress.kept = note


def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
    # Runs in the main thread between two Python bytecodes, possibly inside MindSpore's own
    # Python code: within held() only note the signal, so nothing is raised there.
    signum, _state.forwarded = _state.forwarded or signum, None
    exc = Interrupted(signum, activity())
    if _state.depth > 0:
        _state.pending = _state.pending or exc
        return
    raise exc


@contextlib.contextmanager
def held(activity: Optional[str] = None) -> Iterator[None]:
    """Keep SIGINT/SIGTERM until the block ends, then raise :class:`Interrupted`.

    For code that must not see a KeyboardInterrupt in the middle (imports, graph
    compilation, writing a checkpoint). ``activity`` is said while the block runs. Only
    the main thread holds signals (Python runs their handlers there); elsewhere, and
    outside :func:`handling`, the block only says its activity.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    progress = _state.progress
    previous = progress.activity if progress is not None else None
    _state.depth += 1
    if activity is not None:
        doing(activity)
    try:
        yield
    finally:
        _state.depth -= 1
        if progress is not None:
            progress.activity = previous
        if _state.depth == 0 and _state.pending is not None:
            pending, _state.pending = _state.pending, None
            raise pending  # also over an error of the block: the user asked to stop


def import_mindspore():
    """``import mindspore`` with SIGINT blocked and any signal held until it is complete."""
    if "mindspore" in sys.modules:
        return sys.modules["mindspore"]
    with held("loading MindSpore"):
        # Blocked, not only held: the threads MindSpore starts while importing inherit the
        # mask, so a SIGINT never runs a handler in one of them. Delivered when unblocked.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            import mindspore
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return mindspore


def _watch_sigterm() -> None:
    """Wait for SIGTERM (blocked in every thread) and pass it to the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # SIGINT is the main thread's (or MindSpore's)
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        # MindSpore's SIGINT handler sends its own process SIGTERM: that one is a Ctrl-C.
        signum = signal.SIGINT if info.si_pid == os.getpid() else signal.SIGTERM
        _forward(signum)


def _forward(signum: int) -> None:
    """Run the Python handler of ``signum`` in the main thread (nothing if it is ignored)."""
    import _thread

    if _FORWARDS_SIGNUM:
        _thread.interrupt_main(signum)
    else:  # Python 3.9 can only simulate SIGINT; say which signal it stands for
        _state.forwarded = signum
        _thread.interrupt_main()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """For the CLI's main(): SIGINT and SIGTERM raise :class:`Interrupted` (see the module's doc).

    A SIGINT ignored when the process started (a background job of a shell) stays ignored.
    Must be entered in the main thread before any other thread starts, so all inherit the mask.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    if old_int is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    old_mask = None
    if hasattr(signal, "sigwaitinfo"):  # Linux and most Unixes; elsewhere SIGTERM comes as it is
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        if _state.watcher is None:
            _state.watcher = threading.Thread(target=_watch_sigterm, name="vehiclenet-signals", daemon=True)
            _state.watcher.start()
    outer, _state.progress = _state.progress, Progress()
    try:
        yield
    finally:
        _state.progress = outer
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def report(command: Optional[str], exc: BaseException) -> str:
    """The one line for an interrupted command: what it was doing, what is kept."""
    signum = getattr(exc, "signum", signal.SIGINT)
    doing_now = getattr(exc, "activity", None) or activity()
    left = _state.progress.kept if _state.progress is not None else "nothing was written"
    how = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    return f"vehiclenet{' ' + command if command else ''}: {how} while {doing_now}; {left}"


def exit_code(exc: BaseException) -> int:
    """130 for SIGINT (and a plain KeyboardInterrupt), 143 for SIGTERM."""
    return EXIT_CODES.get(getattr(exc, "signum", signal.SIGINT), 130)
