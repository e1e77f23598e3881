"""Which images an embedding run takes: paths, folders walked once, arrays, PIL images, bytes.

Folders are expanded recursively to their image files (by extension, hidden files and folders
skipped, links followed but each real folder and file taken once, a link to a folder that
holds the walk's own start skipped, sorted by path). In-memory inputs are named
``"<array i>"`` / ``"<image i>"`` / ``"<bytes i>"`` (``i`` = position after expanding folders
and stacks).
"""
import errno
import heapq
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import DataError
from ..fileio import is_image_path
from .preprocessing import ImageSource

__all__ = ["Inputs", "ImageInputs", "expand_inputs", "list_images"]

LOG = logging.getLogger(__name__)

Inputs = Union[ImageSource, Sequence[ImageSource]]


def _walk_images(folder: str) -> List[str]:
    """Image files below ``folder``, sorted: each real folder searched once, each file listed once.

    Links are followed, but a link to a folder above ``folder``, and a folder already
    searched (a link loop, two links to one folder), are skipped and logged, and a file
    reached under several names is listed under one. Folders reached without a link are searched first (a heap ordered by
    "through a link", then path), so a file keeps its plain name over a linked one.
    """
    seen: Set[Tuple[int, int]] = set()
    files: Dict[Tuple[int, int], Tuple[bool, str]] = {}
    unreadable: List[str] = []  # dangling links and the like: listed, so embedding names them
    heap: List[Tuple[bool, str]] = [(False, folder)]
    root = os.path.realpath(folder)
    while heap:
        linked, path = heapq.heappop(heap)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                LOG.info("skipped %s: a link to a folder already searched (a link loop or a second link)", path)
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            if path != folder and exc.errno not in (errno.ENOENT, errno.ELOOP):  # gone meanwhile, dangling link
                LOG.warning("skipped the folder %s: cannot list it (%s)%s", path, exc.strerror or exc,
                            "; move its images to a shorter path" if exc.errno == errno.ENAMETOOLONG else "")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            via_link = linked or entry.is_symlink()
            if _is_folder(entry):
                if entry.is_symlink() and _holds(os.path.realpath(entry.path), root):
                    LOG.info("skipped %s: a link to a folder that holds %s (a parent)", entry.path, folder)
                    continue
                heapq.heappush(heap, (via_link, entry.path))
            elif is_image_path(entry.name):
                _add_file(entry, via_link, files, unreadable)
    return sorted([p for _, p in files.values()] + unreadable)


def _holds(outer: str, inner: str) -> bool:
    """Whether the real folder ``outer`` is one of ``inner``'s parents (a link to ``inner``
    itself is a loop, which the walk's record of searched folders catches)."""
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _add_file(entry: os.DirEntry, via_link: bool, files: Dict[Tuple[int, int], Tuple[bool, str]],
              unreadable: List[str]) -> None:
    """Keep ``entry`` unless its file is already listed under a plainer or earlier name."""
    try:
        st = entry.stat()
    except OSError:
        unreadable.append(entry.path)
        return
    key, candidate = (st.st_dev, st.st_ino), (via_link, entry.path)
    if key in files:
        LOG.debug("%s and %s are the same file: embedded once", files[key][1], entry.path)
        candidate = min(candidate, files[key])
    files[key] = candidate


def _as_list(inputs: Inputs) -> List[Any]:
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
        return [inputs]
    return list(inputs)


def _expand(inputs: Inputs) -> Tuple[List[Tuple[str, Any]], List[Tuple[str, str]]]:
    """(name, source) per image, plus (folder, reason) for folders holding no image."""
    items: List[Tuple[str, Any]] = []
    empty: List[Tuple[str, str]] = []
    for src in _as_list(inputs):
        if isinstance(src, (str, os.PathLike)):
            name = os.fspath(src)
            if os.path.isdir(name):
                files = _walk_images(name)
                if not files:
                    empty.append((name, "folder holds no image files"))
                items.extend((f, f) for f in files)
            else:
                items.append((name, name))  # a named file is taken whatever its extension
        elif isinstance(src, np.ndarray) and src.ndim == 4:
            items.extend((f"<array {len(items)}>", a) for a in src)
        elif isinstance(src, np.ndarray):
            items.append((f"<array {len(items)}>", src))
        elif isinstance(src, Image.Image):
            items.append((f"<image {len(items)}>", src))
        elif isinstance(src, (bytes, bytearray)):
            items.append((f"<bytes {len(items)}>", src))
        else:
            raise DataError(f"cannot use {type(src).__name__} as an image: give paths, folders, uint8 arrays, "
                            "PIL images or encoded bytes")
    return items, empty


@dataclass
class ImageInputs:
    """Inputs expanded once (:func:`expand_inputs`): what :func:`embed` takes without walking
    the folders again. ``items`` are (name, source) per image in input order; ``empty`` the
    folders holding no image and ``missing`` the named paths that do not exist, each with why."""

    items: List[Tuple[str, Any]]
    empty: List[Tuple[str, str]]
    missing: List[Tuple[str, str]]

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """DataError for the first missing path or folder without images, as :func:`list_images`."""
        for name, reason in (*self.missing, *self.empty):
            raise DataError(f"{name}: {reason}")


def expand_inputs(inputs: Inputs) -> ImageInputs:
    """``inputs`` with every folder searched (once): see :class:`ImageInputs`."""
    items, empty = _expand(inputs)
    named = [os.fspath(src) for src in _as_list(inputs) if isinstance(src, (str, os.PathLike))]
    missing = [(name, "no such file or folder") for name in named if not os.path.exists(name)]
    return ImageInputs(items, empty, missing)


def list_images(inputs: Inputs) -> List[str]:
    """File paths of ``inputs`` (files and folders; folders expanded recursively, sorted).

    Raises:
        DataError: a path does not exist, a folder holds no image, or an input is not a path.
    """
    paths = []
    for src in _as_list(inputs):
        if not isinstance(src, (str, os.PathLike)):
            raise DataError(f"list_images takes paths, got {type(src).__name__}")
        name = os.fspath(src)
        if os.path.isdir(name):
            files = _walk_images(name)
            if not files:
                raise DataError(f"{name}: folder holds no image files")
            paths.extend(files)
        elif os.path.exists(name):
            paths.append(name)
        else:
            raise DataError(f"{name}: no such file or folder")
    return paths
