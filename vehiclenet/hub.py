"""What ``mindspore_hub.load`` calls: ``create_network(name, *args, **kwargs)``, re-exported by
the repository's ``mindspore_hub_conf.py``.

How the hub client (mindspore_hub 2.0.0) uses it: it executes ``mindspore_hub_conf.py`` by
path with the model folder first on ``sys.path``, calls ``create_network(<card's model-name,
lowercased>, *args, **kwargs)`` with the positional and keyword arguments given to
``mindspore_hub.load`` except its own ``source``, ``pretrained`` and ``force_reload``,
and then, when ``pretrained`` is true (its default), loads the card's checkpoint
itself: ``load_param_into_net(net, load_checkpoint(<card folder>/<asset file>))``.
So this function builds the network **without** weights unless asked to, and:

- ``mindspore_hub.load(card, 575)``: the class count may be given by position.
- ``pretrained`` never reaches this function, so it is read from the calling
  ``mindspore_hub.load`` (a frame of the ``mindspore_hub`` package holding a bool
  ``pretrained``). When the hub will load the card's weights afterwards, options it
  would break or silently undo fail here, before anything is built, saying what to
  pass instead: another ``num_classes`` with ``include_top=True`` (the card's head has
  575 classes), ``checkpoint=`` (the hub would load the card's weights over it) and
  ``weights=`` (the hub would replace them anyway).
- ``weights=True`` (or an asset name of ``assets.json``) is this package's
  ``pretrained`` under another name, because the hub keeps ``pretrained`` for itself:
  with ``mindspore_hub.load(card, pretrained=False, num_classes=10, weights=True)``
  this package downloads the published checkpoint (sha256-verified) and keeps its
  backbone and bottleneck with a new 10-class last layer.
- Called directly (no ``mindspore_hub.load`` in the calling frames), it builds
  exactly what it is asked; ``pretrained=`` is accepted there as well.

Every other keyword goes to :func:`vehiclenet.create_network`: ``include_top``,
``checkpoint``, ``last_stride``, ``device_target``, ``mode`` (None keeps the process's
execution mode; ``"graph"`` is the fast choice for many images), ``amp_level``,
``precision``.
"""
import os
import sys
from typing import Any, Dict, Optional

from .model.factory import MODEL_NAMES, weights_meta
from .model.factory import create_network as _create_network

# Options that may follow num_classes, named in the error for extra positionals.
_KEYWORDS = ("include_top=False", "checkpoint='file.ckpt'", "weights=True", "last_stride=2",
             "device_target='CPU'", "mode='graph'", "amp_level='O2'", "precision='bf16'")


def _hub_call() -> Optional[Dict[str, Any]]:
    """The ``mindspore_hub.load`` call this function runs under: its ``pretrained``, ``name``
    and ``source`` arguments, or None when no ``mindspore_hub`` frame calls it.

    The frame is the client's ``load`` (module ``mindspore_hub.load``); ``pretrained``,
    ``name`` and ``source`` are its public parameters. ``mindspore_hub_conf`` (the
    conf file's module name under the hub) is not the client, hence the exact package test.
    """
    frame = sys._getframe(1)
    try:
        while frame is not None:
            module = frame.f_globals.get("__name__") or ""
            if module == "mindspore_hub" or module.startswith("mindspore_hub."):
                found = frame.f_locals
                if isinstance(found.get("pretrained"), bool):
                    return {"pretrained": found["pretrained"], "name": found.get("name"),
                            "source": found.get("source")}
            frame = frame.f_back
    finally:
        del frame  # frames hold their locals alive
    return None


def _load_call(hub: Dict[str, Any], **shown: Any) -> str:
    """``mindspore_hub.load(<card>, source=..., k=v, ...)`` as the user should write it."""
    card = repr(hub["name"]) if isinstance(hub.get("name"), str) else "card"
    parts = [card]
    if isinstance(hub.get("source"), str) and hub["source"] != "gitee":
        parts.append(f"source={hub['source']!r}")
    parts += [f"{key}={value!r}" for key, value in shown.items()]
    return f"mindspore_hub.load({', '.join(parts)})"


def _check_hub_pretrained(hub: Dict[str, Any], kwargs: Dict[str, Any], card_classes: int) -> None:
    """Raise ValueError for options the hub's own weight loading would break or undo."""
    checkpoint = kwargs.get("checkpoint")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        raise ValueError(
            f"checkpoint={path!r} with mindspore_hub.load's pretrained=True (its default): the hub would load "
            f"the card's checkpoint over {path} afterwards. Pass pretrained=False to mindspore_hub.load: "
            + _load_call(hub, checkpoint=path, pretrained=False)
            + " (the head's size is read from the file)")
    weights = kwargs.get("weights")
    if weights not in (None, False):
        raise ValueError(
            f"weights={weights!r} with mindspore_hub.load's pretrained=True (its default): the hub loads the "
            "card's checkpoint after this package, so these weights would be replaced. Pass pretrained=False to "
            f"mindspore_hub.load to keep them: {_load_call(hub, pretrained=False, weights=weights)}, or drop weights=")
    num_classes = kwargs.get("num_classes")
    if kwargs.get("include_top", True) and num_classes is not None and num_classes != card_classes:
        raise ValueError(
            f"num_classes={num_classes!r} with mindspore_hub.load's pretrained=True (its default): the hub would "
            f"then load the card's {card_classes}-class checkpoint into a {num_classes!r}-class head and fail. "
            "For the published backbone with a new last layer, pass pretrained=False to mindspore_hub.load and "
            "weights=True to this package: "
            + _load_call(hub, num_classes=num_classes, pretrained=False, weights=True)
            + f"; or keep num_classes={card_classes}, or pass include_top=False for the 512-d embedding network")


def _positional(name: str, args: tuple, kwargs: Dict[str, Any]) -> None:
    """Move the one positional option the hub passes on (``num_classes``) into ``kwargs``."""
    if len(args) > 1:
        raise TypeError(
            f"create_network({name!r}, {', '.join(map(repr, args))}): only num_classes may be given by "
            f"position, e.g. mindspore_hub.load(card, {args[0]!r}); pass the other options by keyword: "
            + ", ".join(_KEYWORDS))
    if "num_classes" in kwargs:
        raise TypeError(f"num_classes given twice: {args[0]!r} by position and {kwargs['num_classes']!r} "
                        "by keyword; pass one")
    if isinstance(args[0], bool) or not isinstance(args[0], int):
        raise TypeError(f"create_network({name!r}, {args[0]!r}): the positional argument is num_classes, the "
                        "number of identities of the head (e.g. 575); pass other options by keyword")
    kwargs["num_classes"] = args[0]


def create_network(name: str = "vehiclenet", *args: Any, **kwargs: Any):
    """Return the VehicleNet ``nn.Cell`` for the hub (see the module docstring).

    ``args`` may hold ``num_classes`` only; ``weights`` (True, False or an asset name)
    is :func:`vehiclenet.create_network`'s ``pretrained``; random weights by default.
    """
    if not isinstance(name, str) or name.lower() not in MODEL_NAMES:
        raise NotImplementedError(f"{name} is not implemented in the repo")
    if args:
        _positional(name, args, kwargs)
    if "weights" in kwargs and "pretrained" in kwargs:
        raise TypeError("weights= and pretrained= are the same option under two names; pass one")
    hub = _hub_call()
    if hub is None or not hub["pretrained"]:
        kwargs["pretrained"] = kwargs.pop("weights", kwargs.get("pretrained", False))
        return _create_network(name, **kwargs)
    # The card publishes the manifest's default asset: shape the network for its weights.
    card = weights_meta(pretrained=True)
    _check_hub_pretrained(hub, kwargs, card.num_classes)
    kwargs.pop("weights", None)
    kwargs.setdefault("num_classes", card.num_classes)
    kwargs.setdefault("last_stride", card.last_stride)
    return _create_network(name, pretrained=False, **kwargs)  # the hub loads the card's checkpoint itself
