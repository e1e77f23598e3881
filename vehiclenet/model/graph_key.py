"""The key of a compiled graph: a hash of what shapes the graph MindSpore compiles.

MindSpore's own compile cache checks neither input shapes nor the constants a graph holds
(:mod:`vehiclenet.model.compile_cache`), so this key must change whenever the graph would:
package and MindSpore versions and sources, device, context, parallel settings, inputs,
parameters, kernel library, and every cell with all its attributes but bookkeeping.
Whatever it cannot describe reliably turns the cache off for that graph (None).
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set

LOG = logging.getLogger(__name__)

# A cell's bookkeeping: ids, creation times, compile phases and argument keys, naming
# records, its children (each has its own entry), state-dict records and hooks. Every
# other attribute is keyed, as MindSpore may compile it (set_jit_config, set_inputs, flags,
# recompute, buffers, an optimizer's target).
_BOOKKEEPING = frozenset((
    "arguments_key", "_create_time", "_id", "_cell_init_args", "_cells", "_exist_names", "_exist_objs",
    "_compile_cache", "_compile_phase", "_compiled", "_phase_cache", "_jit_graph_name", "_lazy_construct_sig",
    "_is_check_and_refresh", "__compile_cell_hook__", "_lazy_state_dict_hooks", "_lazy_state_dict_pre_hooks",
    "_lazy_load_state_dict_pre_hooks", "_lazy_load_state_dict_post_hooks", "_saved_tensors_pack_hook",
    "_saved_tensors_unpack_hook", "_lazy_non_persistent_buffers_set"))
# Where the weights came from, not the graph: a resumed run builds its network without a load
# report and must still find the first run's entry.
_NOT_IN_GRAPH = frozenset(("load_report", "weights_meta", "cached_compile"))
# Where MindSpore keeps a cell's forward and backward hooks: Python code run inside the graph.
_HOOKS = ("_lazy_forward_pre_hook", "_lazy_forward_hook", "_lazy_backward_pre_hook", "_lazy_backward_hook",
          "_lazy_forward_pre_hook_with_kwargs", "_lazy_forward_hook_with_kwargs", "_cell_backward_pre_hook",
          "_cell_backward_hook")
# Context settings and environment variables that change what MindSpore compiles.
_CONTEXT_IN_GRAPH = ("jit_config", "jit_syntax_level", "enable_graph_kernel", "graph_kernel_flags", "deterministic",
                     "support_binary")
_ENVIRONMENT_IN_GRAPH = ("MS_JIT_MODULES", "MS_JIT_IGNORE_MODULES", "MS_SUPPORT_BINARY")
_PARALLEL_IN_GRAPH = ("gradients_mean", "comm_fusion", "all_reduce_fusion_config")


class _Unkeyable(Exception):
    """Something in the graph the key cannot describe reliably: compile without the cache."""


def graph_key(net: Any, args: Sequence[Any]) -> Optional[str]:
    """Hash of everything that shapes the graph ``net`` compiles for ``args``; None when part of
    it cannot be described (a hook, a cell or function whose source cannot be read, an object
    of an unknown class, a parallel mode other than data-parallel): such a graph is compiled
    without the cache."""
    import mindspore as ms
    from mindspore.common.hook_handle import _hook_version

    import vehiclenet

    cells = list(net.cells_and_names())
    registered = {id(cell) for _, cell in cells}
    try:
        if _hook_version():  # a tensor or parameter hook was registered in this process
            raise _Unkeyable("a tensor hook was registered")
        parts = {
            "package": vehiclenet.__version__,
            "sources": _sources_digest(),
            "mindspore": ms.__version__,
            "device": ms.get_context("device_target"),
            "context": _context(),
            "parallel": _parallel(),
            "inputs": [[list(a.shape), str(a.dtype)] if hasattr(a, "shape") else _describe(a) for a in args],
            "parameters": [[p.name, list(p.shape), str(p.dtype), p.requires_grad] for p in net.get_parameters()],
            "backend": _backend(net),
            "training": bool(net.training),
            "cells": [_cell(name, cell, registered) for name, cell in cells],
        }
    except (_Unkeyable, RecursionError) as why:  # RecursionError: a container holding itself
        LOG.debug("compile cache off for this graph: %s", why)
        return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _backend(net: Any) -> Optional[List[str]]:
    """The kernel library and precision of the VehicleNet in ``net`` (itself, or a train step's)."""
    for _, cell in net.cells_and_names():
        backend = getattr(cell, "backend", None)
        if backend is not None and hasattr(cell, "last_stride"):
            return [backend.library, backend.precision]
    return None


def _context() -> Dict[str, Any]:
    """The context settings and environment variables that change how MindSpore compiles."""
    import mindspore as ms

    found = {}
    for key in _CONTEXT_IN_GRAPH:
        try:
            found[key] = _describe(ms.get_context(key))
        except ValueError:  # not a setting of this MindSpore version
            found[key] = None
    found["environment"] = {k: v for k, v in sorted(os.environ.items())
                            if k.startswith("MS_DEV_") or k in _ENVIRONMENT_IN_GRAPH}
    return found


def _parallel() -> List[Any]:
    """The parallel settings (baked into a training graph) and this worker's rank: each worker of
    a job has its own entry, so none waits on another's lock while compiling."""
    import mindspore as ms

    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode == "stand_alone":
        return [mode]
    if mode != "data_parallel":  # sharding strategies and layouts: more state than the key names
        raise _Unkeyable(f"parallel mode {mode}")
    from mindspore.communication import get_group_size, get_rank

    try:
        worker = [get_rank(), get_group_size()]
    except RuntimeError:  # the mode is set but no group joined yet
        worker = None
    settings = {}
    for key in _PARALLEL_IN_GRAPH:
        try:
            settings[key] = _describe(ms.get_auto_parallel_context(key))
        except ValueError:  # not a setting of this MindSpore version
            settings[key] = None
    return [mode, settings, worker]


def _cell(name: str, cell: Any, registered: Set[int]) -> List[Any]:
    """One cell: its name, class (and source, outside MindSpore and this package), and every
    attribute but bookkeeping; hooks make a graph unkeyable."""
    state = vars(cell)
    hooks = [k for k in _HOOKS if state.get(k)]
    if hooks:
        raise _Unkeyable(f"{name or 'the network'} has hooks ({', '.join(sorted(hooks))})")
    settings = {}
    for key, value in state.items():
        if key in _BOOKKEEPING or key in _NOT_IN_GRAPH:
            continue
        # set_inputs' tensors are shapes without values
        settings[key] = _placeholders(value) if key == "_dynamic_shape_inputs" else _describe(value, registered)
    return [name, _code(type(cell)), settings]


def _placeholders(value: Any) -> Any:
    if value is None:
        return None
    return [[list(v.shape), str(v.dtype)] if hasattr(v, "shape") else _describe(v) for v in value]


def _code(obj: Any) -> List[Any]:
    """A class or function by module and name; outside MindSpore and this package, also by the
    sha256 of its source file (its code is part of the graph)."""
    module = getattr(obj, "__module__", None) or ""
    named = [module, getattr(obj, "__qualname__", repr(type(obj)))]
    if module.split(".")[0] in ("mindspore", "vehiclenet", "builtins", "numpy"):
        return named
    import inspect

    try:
        source = Path(inspect.getsourcefile(obj)).read_bytes()
    except (TypeError, OSError):
        raise _Unkeyable(f"the source of {'.'.join(named)} cannot be read") from None
    return named + [hashlib.sha256(source).hexdigest()]


def _describe(value: Any, registered: Set[int] = frozenset()) -> Any:
    """A JSON-able, process-independent description of a setting (no addresses or times):
    scalars as they are, tensors and arrays by shape, dtype and content hash, parameters by
    name, operators by class and attributes, functions and classes by :func:`_code`; a cell
    of the graph by class (it has its own entry; one outside it is unkeyable); objects of
    MindSpore's and this package's classes by class (their code is in the key); anything
    else is :class:`_Unkeyable`."""
    import enum
    import functools
    import inspect

    import numpy as np
    from mindspore import Parameter, Tensor, nn
    from mindspore.common.dtype import Type
    from mindspore.ops import Primitive

    def inner(v: Any) -> Any:
        return _describe(v, registered)

    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value] if isinstance(value, np.generic) else value
    if isinstance(value, (np.generic, enum.Enum, Type)):
        return [type(value).__name__, str(value)]
    if isinstance(value, Parameter):
        return ["parameter", value.name]
    if isinstance(value, (Tensor, np.ndarray)):
        data = _array(value)
        return ["array", list(data.shape), str(value.dtype), hashlib.sha256(data.tobytes()).hexdigest()]
    if isinstance(value, nn.Cell):
        if id(value) not in registered:
            raise _Unkeyable(f"a {type(value).__name__} cell held outside the network's cells")
        return ["cell", _code(type(value))]
    if isinstance(value, Primitive):
        return ["operator", _code(type(value)), {k: inner(v) for k, v in sorted(value.attrs.items())}]
    if isinstance(value, tuple):
        return ["tuple", [inner(v) for v in value]]
    if isinstance(value, list):
        return [inner(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return ["set", sorted((inner(v) for v in value), key=json.dumps)]
    if isinstance(value, dict):
        return ["dict", sorted(([inner(k), inner(v)] for k, v in value.items()), key=json.dumps)]
    if isinstance(value, functools.partial):
        return ["partial", inner(value.func), inner(value.args), inner(value.keywords)]
    if inspect.isclass(value) or inspect.isroutine(value):
        return ["code", _code(value)]
    if type(value).__module__.split(".")[0] in ("mindspore", "vehiclenet"):
        return ["object", _code(type(value))]
    raise _Unkeyable(f"a setting of class {type(value).__module__}.{type(value).__qualname__}")


def _array(value: Any) -> Any:
    """The values of a tensor or array as numpy (bf16 widened: numpy has none)."""
    from mindspore import Tensor

    if not isinstance(value, Tensor):
        return value
    try:
        return value.float().asnumpy() if "BFloat16" in str(value.dtype) else value.asnumpy()
    except (ValueError, RuntimeError, TypeError) as exc:  # a tensor without values: no content to key
        raise _Unkeyable(f"a tensor of shape {value.shape} without values ({exc})") from None


def _sources_digest(root: Optional[Path] = None) -> str:
    """sha256 over the package's Python and C sources, in every sub-package too (a changed
    network never reuses a graph, wherever its module lives)."""
    root = Path(__file__).resolve().parent.parent if root is None else root
    digest = hashlib.sha256()
    files = [p for p in root.rglob("*") if p.is_file() and (p.suffix == ".py" or "csrc" in p.relative_to(root).parts)]
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
