"""Deprecated: the names of ``vehiclenet.evaluation`` before the package was regrouped, kept for one
release. They now live in vehiclenet.retrieval.metrics, vehiclenet.retrieval.exact, vehiclenet.embedding.files and vehiclenet.datasets.veri; import them from there."""
import warnings

warnings.warn("vehiclenet.evaluation is deprecated: import from the modules its docstring names",
              DeprecationWarning, stacklevel=2)

from .datasets.veri import VeriSplit, parse_veri_name, read_veri, read_veri_split, veri_id  # noqa: F401
from .embedding.files import FEATURE_KEYS, RECORD_KEYS, FeatureSet, load_features_npz, read_records, save_features_npz  # noqa: F401,E501
from .retrieval.exact import cosine_distance, cosine_distance_blocks  # noqa: F401
from .retrieval.metrics import EvalResult, evaluate, evaluate_blocks, evaluate_features  # noqa: F401
