"""Folders in the layouts of VehicleID and VERI-Wild, written from rows the test chooses."""
import io
import os
from typing import Dict, Iterable, Sequence, Tuple

from PIL import Image

INFO_HEADER = "id;Camera ID;Time;Model;Type;Color\n"


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (90, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _tiny_jpeg()


def write_text(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_image(path, data: bytes = JPEG) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def make_vehicleid(root, rows: Iterable[Tuple[str, int]], list_name: str = "test_list_800.txt",
                   images: Dict[str, bytes] = None) -> str:
    """``<root>/image/<imgid>.jpg`` and ``<root>/train_test_split/<list_name>`` with ``imgid vid`` rows;
    ``images`` maps an image id to its JPEG bytes (default: a 4x4 JPEG)."""
    rows = list(rows)
    for imgid, _ in rows:
        write_image(os.path.join(root, "image", f"{imgid}.jpg"), (images or {}).get(imgid, JPEG))
    write_text(os.path.join(root, "train_test_split", list_name), "".join(f"{i} {v}\n" for i, v in rows))
    return str(root)


def make_veriwild(root, query: Sequence[str], gallery: Sequence[str], cams: Dict[str, int], n: int = 3000,
                  info_extra: str = "", images: Dict[str, bytes] = None) -> str:
    """``images/<vid>/<imgid>.jpg``, ``test_<n>_query.txt``, ``test_<n>.txt`` and ``vehicle_info.txt``.

    ``query``/``gallery`` are ``vid/imgid`` keys; ``cams`` maps every key to its camera; ``images``
    maps a key to its JPEG bytes (default: a 4x4 JPEG)."""
    for key in set(query) | set(gallery):
        vid, imgid = key.split("/")
        write_image(os.path.join(root, "images", vid, f"{imgid}.jpg"), (images or {}).get(key, JPEG))
    split = os.path.join(root, "train_test_split")
    write_text(os.path.join(split, f"test_{n}_query.txt"), "".join(k + "\n" for k in query))
    write_text(os.path.join(split, f"test_{n}.txt"), "".join(k + "\n" for k in gallery))
    write_text(os.path.join(split, "vehicle_info.txt"), INFO_HEADER + "".join(
        f"{k};{c};2018-03-11 12:00:{i:02d};Audi-A4;Sedan;Black\n" for i, (k, c) in enumerate(cams.items()))
        + info_extra)
    return str(root)
