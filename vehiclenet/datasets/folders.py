"""Training images from a folder: one sub-folder per vehicle (``ROOT/<id>/*.jpg``) or VeRi-776's
``image_train/``, each identity mapped to a label 0..N-1, and the label map beside a run."""
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write, is_image_path
from .veri import veri_id

__all__ = ["LABELS_FILE", "TrainingData", "scan_training_data", "save_label_map", "load_label_map"]

LOG = logging.getLogger(__name__)

LABELS_FILE = "labels.json"

PathLike = Union[str, os.PathLike]


@dataclass
class TrainingData:
    """Images with labels 0..N-1 and the identity each label stands for."""

    root: str
    layout: str  # "folders" (ROOT/<id>/*.jpg) or "veri" (image_train/VVVV_cCCC_...jpg)
    paths: List[str]
    labels: np.ndarray = field(repr=False)
    identities: List[str] = field(repr=False)  # identities[label] = original id

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and is_image_path(name)



def _sort_ids(ids) -> List[str]:
    ids = list(ids)
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def _check_decodable(paths: Sequence[str]) -> None:
    """Reject files that are not images before training starts (header check, cheap)."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            bad.append(f"{p} ({type(exc).__name__})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(f"{len(bad)} training image(s) cannot be decoded: {shown}. "
                        "Remove or replace them (only images belong in the data folder).")


def scan_training_data(root: PathLike, *, check_images: bool = True) -> TrainingData:
    """Find training images and map their identities to labels 0..N-1.

    Layouts: ``ROOT/<id>/*.jpg`` (one folder per identity), or VeRi-776
    (``ROOT/image_train/VVVV_cCCC_...jpg`` or those files directly in ``ROOT``;
    id = int(VVVV)). Identities are sorted (numerically when all are numbers).

    Raises DataError for a missing or empty folder, fewer than two identities, or
    files that are not images.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"training data folder {root!r} does not exist or is not a folder; give --data the "
                        "folder holding one sub-folder per identity (ROOT/<id>/*.jpg) or VeRi-776's image_train/")
    veri_dir = os.path.join(root, "image_train")
    if os.path.isdir(veri_dir):
        layout, image_dir = "veri", veri_dir
    else:
        image_dir = root
        top = [n for n in os.listdir(root) if _is_image(n)]
        layout = "veri" if top and all(veri_id(n) is not None for n in top) else "folders"

    per_id: Dict[str, List[str]] = {}
    if layout == "veri":
        for name in sorted(os.listdir(image_dir)):
            if not _is_image(name):
                continue
            vid = veri_id(name)
            if vid is None:
                raise DataError(f"{os.path.join(image_dir, name)!r} is not named like a VeRi-776 training image "
                                "('VVVV_cCCC_....jpg'); rename it or use the ROOT/<id>/*.jpg layout")
            per_id.setdefault(str(vid), []).append(os.path.join(image_dir, name))
    else:
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if os.path.isdir(folder) and not name.startswith("."):
                images = sorted(os.path.join(folder, n) for n in os.listdir(folder) if _is_image(n))
                if images:
                    per_id[name] = images
    if not per_id:
        raise DataError(f"no training images found in {root!r}: expected ROOT/<id>/*.jpg (one folder per identity) "
                        "or VeRi-776's image_train/ with VVVV_cCCC_*.jpg files")
    if len(per_id) < 2:
        only = next(iter(per_id))
        raise DataError(f"{root!r} holds a single identity ({only!r}); classification fine-tuning needs at least "
                        "two identities (one sub-folder per identity)")
    identities = _sort_ids(per_id)
    paths, labels = [], []
    for label, ident in enumerate(identities):
        paths += per_id[ident]
        labels += [label] * len(per_id[ident])
    if check_images:
        _check_decodable(paths)
    LOG.info("training data %s (%s layout): %d images, %d identities", root, layout, len(paths), len(identities))
    return TrainingData(root, layout, paths, np.asarray(labels, np.int32), identities)


def save_label_map(data: TrainingData, out_dir: PathLike) -> Path:
    """Write ``labels.json`` (label -> original identity) into ``out_dir``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LABELS_FILE
    doc = {"num_classes": data.num_classes, "layout": data.layout, "root": os.path.abspath(data.root),
           "identities": data.identities, "label_of": {ident: i for i, ident in enumerate(data.identities)}}
    with atomic_write(path, "w") as handle:
        json.dump(doc, handle, indent=1)
    return path


def load_label_map(path: PathLike) -> List[str]:
    """The identities of a ``labels.json`` (or the folder holding it), indexed by label."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    try:
        doc = json.loads(path.read_text())
        return [str(i) for i in doc["identities"]]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the label map {str(path)!r}: {exc}") from exc
