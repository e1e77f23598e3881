"""Stand-in for ``mindspore_hub.load`` (client 2.0.0), ``source="local"`` only.

It reproduces the measured protocol of mindspore_hub 2.0.0 for a local card
(written from that description, not from the client's code):

1. ``load(name, *args, source, pretrained=True, force_reload=False, **kwargs)``;
   ``pretrained`` is the client's own argument and is never passed on.
2. ``name`` is the path of a card; D is the folder holding the card (after
   resolving links), the model folder is D/<basename of the card's repo-link>.
   It warns "Use local directory, `pretrained` maybe not work."
3. The model folder goes first on ``sys.path``; ``mindspore_hub_conf.py`` there is
   executed by path and ``create_network(<model-name lowercased>, *args, **kwargs)``
   is called; the result must be an ``nn.Cell``.
4. With ``pretrained`` true, the checkpoint D/<file name of the card's asset-link>
   is loaded with ``load_param_into_net(net, load_checkpoint(path))``.

Left out on purpose: the network look-ups (validating repo-link, downloading a
missing model folder or checkpoint; here those raise), ``source="gitee"``, and the
version warning with its 3-second countdown printed on import.
"""
import importlib.util
import os
import sys
import warnings

HUB_CONFIG_FILE = "mindspore_hub_conf.py"
ENTRY_POINT = "create_network"
REQUIRED_KEYS = ("model-name", "backbone-name", "module-type", "fine-tunable", "model-version", "train-dataset",
                 "evaluation", "author", "update-time", "repo-link", "user-id", "used-for", "mindspore-version",
                 "asset", "file-format", "asset-link", "asset-sha256", "license", "summary")


def read_card(path: str) -> dict:
    """The ``key: value`` fields of a card's header (between its first two ``---`` lines),
    ``<...>`` stripped; raises ValueError naming a missing required key."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    parts = text.split("\n---\n")
    if len(parts) < 3:
        raise ValueError(f"{path}: no header between '---' lines")
    fields = {}
    for line in parts[1].splitlines():
        key, sep, value = line.strip().lstrip("-").strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip().strip("<>")
    missing = [key for key in REQUIRED_KEYS if key not in fields]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return fields


def _create_from_folder(model_name: str, net_dir: str, *args, **kwargs):
    """Execute D/<model folder>/mindspore_hub_conf.py by path and call its create_network."""
    sys.path.insert(0, net_dir)
    config_path = os.path.join(os.path.abspath(net_dir), HUB_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} not exists.")
    spec = importlib.util.spec_from_file_location(HUB_CONFIG_FILE, config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, ENTRY_POINT):
        raise KeyError(f"no {ENTRY_POINT} in {config_path}")
    return getattr(module, ENTRY_POINT)(model_name.lower(), *args, **kwargs)


def load(name, *args, source="local", pretrained=True, force_reload=False, **kwargs):
    """Build the network of the card ``name`` through its model folder, then load the
    card's checkpoint into it when ``pretrained`` (the measured 2.0.0 flow)."""
    from mindspore import nn
    from mindspore import load_checkpoint, load_param_into_net

    if not isinstance(name, str):
        raise TypeError("Network name must be a string of name or a url.")
    if not isinstance(force_reload, bool):
        raise TypeError("`force_reload` must be a bool type.")
    if not isinstance(pretrained, bool):
        raise TypeError("`pretrained` must be a bool type.")
    if source != "local":
        raise NotImplementedError("this stand-in reproduces source='local' only")
    warnings.warn("Use local directory, `pretrained` maybe not work.")
    md_path = os.path.realpath(os.path.expanduser(name))
    target_path = os.path.dirname(md_path)
    card = read_card(md_path)
    net_dir = os.path.join(target_path, os.path.basename(card["repo-link"]))
    if force_reload or not os.path.isdir(net_dir):
        raise NotImplementedError(f"the client would download {card['repo-link']} into {target_path}; "
                                  "this stand-in has no network")

    net = _create_from_folder(card["model-name"], net_dir, *args, **kwargs)
    if not isinstance(net, nn.Cell):
        raise TypeError(f"`create_net` should be return a `Cell` type network, but got {type(net)}.")
    if pretrained:
        ckpt_path = os.path.join(target_path, os.path.basename(card["asset-link"]))
        if not os.path.exists(ckpt_path):
            raise NotImplementedError(f"the client would download {card['asset-link']}; this stand-in has no network")
        load_param_into_net(net, load_checkpoint(ckpt_path))
    return net
