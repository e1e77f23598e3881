"""Vehicle re-identification benchmarks: readers of their layouts, and a registry by name.

========== ==================== ===================== =====================================
name       dataset              test splits           protocol
========== ==================== ===================== =====================================
veri       VeRi-776             (one)                 query vs gallery, junk = same id+camera
vehicleid  VehicleID            small, medium, large  random one-image-per-identity gallery,
                                                      repeated over seeded trials
veriwild   VERI-Wild            small, medium, large  query list vs gallery list, junk = same
                                                      id+camera (cameras from vehicle_info.txt)
========== ==================== ===================== =====================================

Readers only list files and check that the images exist; they never open an image.
Each module's docstring gives the dataset's layout, sizes and protocol.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

from ..errors import UsageError
from .lists import LabelledImages, QueryGallery
from .vehicleid import read_vehicleid
from .veri import read_veri_test
from .veriwild import read_veriwild

__all__ = ["Dataset", "DATASETS", "get_dataset", "LabelledImages", "QueryGallery"]

# How a dataset is tested: a fixed query set against a fixed gallery, or the VehicleID
# protocol, where one test list is split at random into gallery and queries per trial.
QUERY_GALLERY = "query-gallery"
RANDOM_GALLERY = "random-gallery"


@dataclass(frozen=True)
class Dataset:
    """A benchmark: its name, title, test splits (empty: one fixed test set), protocol and reader.

    ``read(root, split)`` gives a :class:`QueryGallery` (``query-gallery``) or the
    :class:`LabelledImages` of the whole test list (``random-gallery``).
    """

    name: str
    title: str
    splits: Tuple[str, ...]
    protocol: str
    reader: Callable[[str, Optional[str]], Union[QueryGallery, LabelledImages]]

    def read(self, root: str, split: Optional[str]) -> Union[QueryGallery, LabelledImages]:
        """The test data of ``split`` under ``root``."""
        return self.reader(root, self.check_split(split))

    def check_split(self, split: Optional[str]) -> Optional[str]:
        """``split`` if this dataset has it; UsageError otherwise (also for a split of VeRi-776)."""
        if not self.splits:
            if split is not None:
                raise UsageError(f"--split: {self.title} has one test set; --split applies to "
                                 "--dataset vehicleid and veriwild")
            return None
        if split not in self.splits:
            raise UsageError(f"--split: {self.title} needs a test split, one of {', '.join(self.splits)}")
        return split


DATASETS: Dict[str, Dataset] = {
    "veri": Dataset("veri", "VeRi-776", (), QUERY_GALLERY, read_veri_test),
    "vehicleid": Dataset("vehicleid", "VehicleID", ("small", "medium", "large"), RANDOM_GALLERY, read_vehicleid),
    "veriwild": Dataset("veriwild", "VERI-Wild", ("small", "medium", "large"), QUERY_GALLERY, read_veriwild),
}


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; UsageError naming the choices otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
