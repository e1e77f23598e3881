"""Labelled image lists shared by the dataset readers, and the checks on list files."""
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from ..errors import DataError


@dataclass
class LabelledImages:
    """Image paths with their vehicle ids and camera numbers (ints), in list order."""

    paths: List[str]
    ids: np.ndarray = field(repr=False)
    cams: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class QueryGallery:
    """A query set, a gallery and the files they were read from (inputs of the command)."""

    query: LabelledImages
    gallery: LabelledImages
    sources: Tuple[str, ...] = ()
    query_in_gallery: int = 0  # query images found in the gallery list and left out of the gallery


def require_dir(path: str, what: str, remedy: str) -> None:
    """DataError naming ``path`` unless it is a folder."""
    if not os.path.isdir(path):
        state = "is not a folder" if os.path.exists(path) else "is missing"
        raise DataError(f"{what} {path!r} {state}; {remedy}")


def require_file(path: str, what: str, remedy: str) -> None:
    """DataError naming ``path`` unless it is a regular file."""
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "is missing"
        raise DataError(f"{what} {path!r} {state}; {remedy}")


def list_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(1-based line number, stripped line) of every non-blank line of a text list file."""
    try:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                line = line.strip()
                if line:
                    yield lineno, line
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text list ({exc.reason} at byte {exc.start}); "
                        "give the dataset's own list file") from None


def check_unique(path: str, keys: Sequence[str], linenos: Sequence[int]) -> None:
    """DataError naming both lines when an image is listed twice in one list file."""
    seen = {}
    for key, lineno in zip(keys, linenos):
        if key in seen:
            raise DataError(f"{path}:{lineno}: image {key!r} is listed twice (also line {seen[key]}); "
                            "each image may appear once: restore the dataset's own list file")
        seen[key] = lineno


def check_images_exist(list_path: str, paths: Sequence[str]) -> None:
    """DataError naming the first few images of ``list_path`` that are not files (stat only, never opened)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{list_path} names {len(missing)} image(s) that do not exist: {shown} "
                        "(unpack the whole dataset under its root, or give the root it was unpacked to)")
