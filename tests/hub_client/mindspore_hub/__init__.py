"""Test-side stand-in for the ``mindspore_hub`` client (see :mod:`mindspore_hub.load`).

The real client is not on the package registries the test machines reach; this
package reproduces the measured ``source="local"`` protocol of client 2.0.0 so the
tests can drive ``mindspore_hub_conf.py`` exactly as the hub does.
"""
from .load import load

__all__ = ["load"]
