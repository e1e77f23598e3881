"""The file ``mindspore_hub.load`` executes; it calls ``create_network(name, *args, **kwargs)``.

What that does under the hub (positional ``num_classes``, ``weights=``, options the hub's
own ``pretrained=True`` would undo failing at once): :mod:`vehiclenet.hub`.
"""
import os
import sys

# The hub executes this file by path; make the package beside it importable.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from vehiclenet.hub import create_network  # noqa: E402

__all__ = ["create_network"]
