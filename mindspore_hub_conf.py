"""The file ``mindspore_hub.load`` executes: ``create_network(name, *args, **kwargs)``.

The hub loads the published weights itself after this returns (it downloads the
card's asset, checks its sha256 and calls ``load_param_into_net``), so weights are
fetched here only when ``pretrained=True`` is passed explicitly.
"""
import os
import sys

# The hub executes this file by path; make the package beside it importable.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from vehiclenet.model import create_network as _create_network  # noqa: E402


def create_network(name: str = "vehiclenet", *args, **kwargs):
    """Return the VehicleNet ``nn.Cell`` for the hub; no download unless ``pretrained=True``."""
    if args:
        raise TypeError(f"mindspore_hub.load(..., {', '.join(map(repr, args))}): pass VehicleNet options by "
                        "keyword, e.g. num_classes=..., include_top=False, last_stride=..., pretrained=True")
    kwargs.setdefault("pretrained", False)
    return _create_network(name, *args, **kwargs)
