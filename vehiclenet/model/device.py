"""Device and execution-mode selection.

Ascend is the production target and is chosen whenever it is usable; nothing here
may fail on a CPU-only machine.
"""
import contextlib
import logging
from typing import Iterator, Optional

LOG = logging.getLogger(__name__)

TARGETS = ("Ascend", "GPU", "CPU")
MODES = ("graph", "pynative")
AMP_LEVELS = ("O0", "O1", "O2", "O3")


def _normalise_target(device_target: str) -> str:
    for target in TARGETS:
        if device_target.lower() == target.lower():
            return target
    raise ValueError(f"device_target must be one of {TARGETS} (or None to choose automatically), "
                     f"got {device_target!r}")


def _plugin_installed(target: str) -> Optional[bool]:
    """Whether MindSpore has the plugin package for ``target``, asked without loading it
    (None: this MindSpore cannot tell)."""
    try:
        from mindspore._c_expression import MSContext
    except ImportError:  # private API
        return None
    try:
        return bool(MSContext.get_instance().is_pkg_support_device(target))
    except (AttributeError, RuntimeError, TypeError) as exc:
        LOG.debug("cannot ask MindSpore whether the %s plugin is installed: %s", target, exc)
        return None


@contextlib.contextmanager
def _quiet_mindspore() -> Iterator[None]:
    """Raise MindSpore's own logger to ERROR for the block.

    MindSpore logs through ``mindspore.log._get_logger()``, which does not propagate to
    ``logging.getLogger("mindspore")``; probing a missing device logs ~6 warning lines there.
    """
    try:
        from mindspore.log import _get_logger
        ms_logger = _get_logger()
    except (ImportError, AttributeError):  # private API; without it the probe stays as loud as MindSpore made it
        yield
        return
    level = ms_logger.level
    ms_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ms_logger.setLevel(level)


def _usable(target: str) -> bool:
    """True when the MindSpore package has a working plugin and at least one device for target."""
    if target == "CPU":
        return True
    # Most machines lack the plugin: answer from the package list, without the noisy probe.
    if _plugin_installed(target) is False:
        LOG.debug("%s: no MindSpore plugin installed", target)
        return False
    import mindspore as ms

    module = getattr(ms.device_context, target.lower())
    # We log our own choice; MindSpore's warnings of a failed probe would only confuse.
    with _quiet_mindspore():
        try:
            if not module.is_available():
                return False
            return module.device_count() > 0
        except Exception as exc:  # a broken driver must not stop a CPU run
            LOG.debug("%s unusable: %s", target, exc)
            return False


def device_already_set() -> Optional[str]:
    """The device this process already uses, else None.

    That is the one chosen with ``mindspore.set_device``, or, when the process ran
    MindSpore operations before choosing, the device whose runtime they started:
    MindSpore refuses ``set_device`` after that, so we must go along with it.
    """
    try:
        from mindspore._c_expression import DeviceContextManager, DeviceManagerConf
    except ImportError:  # private API; without it we cannot tell, so we choose ourselves
        return None
    conf = DeviceManagerConf.get_instance()
    if conf.is_device_enable():
        return conf.get_device_target()
    contexts = DeviceContextManager.get_instance()
    for target in TARGETS:  # an Ascend or GPU run also starts the CPU runtime for host work
        context = contexts.get_device_context(target)
        if context is not None and context.initialized():
            return target
    return None


def choose_device(device_target: Optional[str] = None) -> str:
    """The device to use: the one asked for, the one the process set, else Ascend > GPU > CPU."""
    if device_target is not None:
        return _normalise_target(device_target)
    already = device_already_set()
    if already:
        return already
    for target in TARGETS:
        if _usable(target):
            return target
    return "CPU"


def configure(device_target: Optional[str] = None, mode: Optional[str] = None) -> str:
    """Set MindSpore's device and, when ``mode`` is given, its execution mode; returns the device target.

    A device the process already uses (``mindspore.set_device``, or operations run
    before this call) is respected; an explicit ``device_target`` that differs from it
    raises, because MindSpore cannot switch devices once set. ``mode=None`` keeps the
    process's execution mode (MindSpore's own default is PyNative); "graph" or
    "pynative" sets it.
    """
    import mindspore as ms

    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None (keep the process's mode), got {mode!r}")
    already = device_already_set()
    target = choose_device(device_target)
    if already and already != target:
        raise ValueError(f"device_target={device_target!r} asked for, but this process already set "
                         f"{already!r} (mindspore.set_device, or MindSpore operations run before), "
                         "which cannot change; "
                         "drop device_target or start a new process")
    if not already:
        ms.set_device(target)
        LOG.info("device: %s (chosen automatically)" if device_target is None else "device: %s", target)
    else:
        LOG.info("device: %s (set by the process)", target)
    if mode is not None:
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    return target


@contextlib.contextmanager
def synchronous_pynative() -> Iterator[None]:
    """In PyNative mode, MindSpore's operators launched from the calling thread for the block,
    not through its asynchronous launch queues; other modes and nested blocks pass through.

    While one long operator runs (the whole-backbone op of :mod:`vehiclenet.model.cpu_kernels`),
    the queues' threads spin and take a core from its OpenMP team: on 2 cores a batch of 8
    at 384x384 took 2.5 s asynchronously against 1.25-1.4 s launched synchronously, as fast
    as graph mode. Operations queued before the block finish first, so the order holds.
    """
    switch = _launch_switch()
    if switch is None:
        yield
        return
    from mindspore.common.api import _pynative_executor

    _pynative_executor.sync()  # what was queued asynchronously runs before the block's operators
    switch(True)
    try:
        yield
    finally:
        switch(False)


def _launch_switch():
    """A function turning MindSpore's synchronous PyNative launch on and off, or None when
    it should not be touched: not PyNative, already synchronous (the user's choice, or an
    enclosing block), or this MindSpore has no such switch. Private API, hence the guards:
    ``set_context(pynative_synchronize=...)`` would log a deprecation warning at every call."""
    import mindspore as ms

    if ms.get_context("mode") != ms.PYNATIVE_MODE:
        return None
    try:
        from mindspore._c_expression import ms_ctx_param
        from mindspore.context import _context

        context, key = _context(), ms_ctx_param.pynative_synchronize
        if context.get_param(key):
            return None
    except (ImportError, AttributeError, RuntimeError) as exc:
        LOG.debug("cannot switch PyNative's launch to synchronous: %s", exc)
        return None
    return lambda on: context.set_param(key, on)


# Up to this many images, PyNative answers sooner than compiling the graph first; beyond,
# graph mode, whose compiled graph the next process loads from the cache. Measured
# (benchmarks/cold_start.py "calls" rows, one run; AMD EPYC Zen 3, 2 cores, AVX2, 384x384):
# first call on 2 / 8 / 32 images (compilation or set-up included) graph 3.17 / 4.29 / 8.18 s,
# PyNative 0.97 / 1.94 / 5.62 s; later calls graph 0.36 / 1.43 / 4.93 s, PyNative 0.38 / 1.37 /
# 5.30 s, since the network launches its operators synchronously in PyNative (before that,
# on Zen 4: 0.40 / 1.32 / 6.9 s against graph's 0.27 / 0.97 / 3.8 s). Features are identical.
PYNATIVE_MAX_IMAGES = 4


def mode_for_images(images: int) -> str:
    """The execution mode that finishes a job of ``images`` images soonest on a CPU:
    ``"pynative"`` for a handful (no compilation), ``"graph"`` beyond."""
    return "pynative" if 0 < images <= PYNATIVE_MAX_IMAGES else "graph"


def default_amp_level(device_target: str) -> str:
    """O2 (float16, BatchNorm kept in float32) on Ascend; O0 (float32) elsewhere."""
    return "O2" if device_target == "Ascend" else "O0"
