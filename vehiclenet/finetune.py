"""Deprecated: the names of ``vehiclenet.finetune`` before the package was regrouped, kept for one
release. They now live in vehiclenet.training.finetune and vehiclenet.datasets.folders; import them from there."""
import warnings

warnings.warn("vehiclenet.finetune is deprecated: import from the modules its docstring names",
              DeprecationWarning, stacklevel=2)

from .datasets.folders import LABELS_FILE, TrainingData, load_label_map, save_label_map, scan_training_data  # noqa: F401,E501
from .training.finetune import *  # noqa: F401,F403
