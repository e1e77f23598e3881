"""Deprecated: the names of ``vehiclenet.features`` before the package was regrouped, kept for one
release. They now live in vehiclenet.embedding.features, .inputs, .result, .files and vehiclenet.retrieval.exact; import them from there."""
import warnings

warnings.warn("vehiclenet.features is deprecated: import from the modules its docstring names",
              DeprecationWarning, stacklevel=2)

from .embedding.features import batch_plan, embed, extract_features, input_size  # noqa: F401
from .embedding.files import load_features  # noqa: F401
from .embedding.inputs import ImageInputs, Inputs, expand_inputs, list_images  # noqa: F401
from .embedding.result import FeatureResult, save_features  # noqa: F401
from .retrieval.exact import nearest  # noqa: F401
