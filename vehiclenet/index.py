"""Deprecated: the names of ``vehiclenet.index`` before the package was regrouped, kept for one
release. They now live in vehiclenet.retrieval.index; import them from there."""
import warnings

warnings.warn("vehiclenet.index is deprecated: import from the modules its docstring names",
              DeprecationWarning, stacklevel=2)

from .retrieval.index import *  # noqa: F401,F403
