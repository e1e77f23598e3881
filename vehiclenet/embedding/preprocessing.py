"""Evaluation pre-processing of the published model, shared by every path that feeds the network.

decode to RGB uint8 -> ``mindspore.dataset.vision.Resize((384, 384), Inter.BICUBIC)`` on the
HWC uint8 array -> normalise with ImageNet mean/std scaled to 0..255 -> CHW float32.

Why these choices (facts checked on MindSpore 2.8.0):

- The reference decoded with ``vision.Decode()`` (libjpeg-turbo) and resized the resulting
  *numpy* array, i.e. with MindSpore's own C++ bicubic kernel. That kernel differs from
  Pillow's bicubic (up to ~8 grey levels), so the resize is done with the MindSpore op on a
  numpy array; never hand it a PIL image (it would then fall back to Pillow's resize).
- Pillow's JPEG decode is bit-identical to ``vision.Decode()`` for baseline JPEGs, and Pillow
  also reads PNG/BMP/WebP/TIFF/GIF, so Pillow decodes.
- EXIF orientation is NOT applied: the reference's decoder ignored it and the published
  weights were evaluated on un-rotated pixels. Rotate files yourself if you need that.
- Alpha is dropped, not composited (as ``Image.convert("RGB")`` and the reference's decoder
  do); palette, grey, CMYK images go through ``convert("RGB")``; 16/32-bit integer images are
  scaled to 8 bits (``convert`` would clip them to 255 instead).
- ``vision.Normalize`` + ``HWC2CHW`` are used for the last step; they give the same float32
  values as ``(x.astype(float32) - mean) / std`` and run about 4x faster than numpy.

Memory is bounded: a JPEG at least 4x the network input on both sides is decoded at 1/2, 1/4
or 1/8 scale by libjpeg (Pillow's ``draft``), never below twice the input size, so a 13000 px
photo costs a few MB instead of 700. Other formats cannot be decoded at reduced scale: an
image of more than ``VEHICLENET_MAX_PIXELS`` pixels (default 40 million, e.g. 8000x5000;
decoding takes about 7 bytes per pixel) is refused with a DataError naming the file, from its
header, before any pixel is decoded.
"""
import io
import os
import threading
from typing import BinaryIO, Callable, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import env
from ..errors import DataError, ImageDecodeError
from ..fileio import IMAGE_EXTENSIONS, is_image_path  # re-exported: part of this module's API
from ..fileio import NotRegularFileError, open_regular

__all__ = ["IMAGE_EXTENSIONS", "INPUT_SIZE", "MEAN", "STD", "ImageSource", "eval_transforms", "is_image_path",
           "load_image", "max_pixels", "preprocess", "preprocess_image", "to_rgb_uint8"]

INPUT_SIZE: Tuple[int, int] = (384, 384)  # (height, width) the published weights were evaluated at
MEAN: Tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD: Tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

ENV_MAX_PIXELS = env.MAX_PIXELS  # its name, for messages
DRAFT_MARGIN = 2  # a drafted JPEG keeps at least this many times the network input on each side

_OPS = threading.local()


def eval_transforms(size: Tuple[int, int] = INPUT_SIZE) -> list:
    """The evaluation chain as ``mindspore.dataset`` transforms (HWC uint8 RGB -> CHW float32):
    bicubic resize to ``size`` = (height, width), normalise, HWC to CHW."""
    import mindspore.dataset.vision as vision
    from mindspore.dataset.vision import Inter

    return [vision.Resize(list(size), interpolation=Inter.BICUBIC),
            vision.Normalize(mean=list(MEAN), std=list(STD)),
            vision.HWC2CHW()]


def _ops(size: Tuple[int, int]):
    # mindspore is imported on first use only; one op set per thread and size, because the
    # eager ops are cheap to build but we do not rely on them being shareable across threads.
    cache = getattr(_OPS, "cache", None)
    if cache is None:
        cache = _OPS.cache = {}
    ops = cache.get(size)
    if ops is None:
        ops = cache[size] = tuple(eval_transforms(size))
    return ops


def _scale_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    # Full-range scaling (65535 -> 255) rather than clipping, so 16-bit scans keep their contrast.
    return np.clip(np.rint(arr.astype(np.float64) / ((1 << bits) - 1) * 255.0), 0, 255).astype(np.uint8)


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image as an RGB uint8 HWC array (no EXIF rotation, alpha dropped, 16-bit scaled)."""
    if img.mode == "RGB":
        arr = np.asarray(img)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = _scale_to_uint8(np.asarray(img), 16)
    elif img.mode == "I":
        raw = np.asarray(img)
        # PNG 16-bit greyscale often arrives as mode "I"; only a wider range means 32 bits.
        arr = _scale_to_uint8(raw, 16 if raw.max(initial=0) <= 65535 and raw.min(initial=0) >= 0 else 32)
    elif img.mode == "F":
        raw = np.asarray(img, dtype=np.float64)
        # Float images are taken as 0..1 when they fit, else as 0..255 grey levels.
        scale = 255.0 if raw.size and np.nanmax(raw) <= 1.0 else 1.0
        arr = np.clip(np.rint(np.nan_to_num(raw) * scale), 0, 255).astype(np.uint8)
    else:
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8 (got {arr.dtype}); convert e.g. with "
                        "(x * 255).round().clip(0, 255).astype(np.uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])  # HWC RGB(A); alpha dropped
    raise DataError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4 (RGB order); got shape {arr.shape}")


def max_pixels() -> int:
    """The largest image (width x height, after JPEG draft) :func:`load_image` decodes:
    ``$VEHICLENET_MAX_PIXELS``, else 40 million."""
    return env.max_pixels()


def load_image(src: ImageSource, size: Optional[Tuple[int, int]] = INPUT_SIZE) -> np.ndarray:
    """Decode ``src`` (file path, encoded bytes, PIL image or HWC/HW uint8 array) to RGB uint8 HWC.

    ``size`` is the (height, width) the image will be resized to: a JPEG at least
    4x larger on both sides is decoded at reduced scale, keeping at least twice ``size``
    (None: always full size). Files and bytes larger than :func:`max_pixels` are refused.

    Raises:
        ImageDecodeError: a file or bytes that are missing, unreadable, corrupt, too large or no
            image; the message names the file.
        DataError: an array or object that is no image.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, Image.Image):
        try:
            return to_rgb_uint8(src)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot convert PIL image ({src.mode}, {src.size}) to RGB: {exc}") from None
    name, opener = _opener(src)
    limit = max_pixels()  # read before decoding: a bad value is a UsageError, whatever the image
    try:
        with opener() as fh, Image.open(fh) as img:
            _draft_and_check(img, name, size, limit)
            img.load()  # decode now so truncated files fail here, inside the try
            return to_rgb_uint8(img)
    except NotRegularFileError as exc:
        raise ImageDecodeError(name, f"{name}: {exc.what}, not an image file") from None
    except FileNotFoundError:
        raise ImageDecodeError(name, f"{name}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(name, f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(name, f"{name}: not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"{name}: too large to decode ({exc}); shrink the image first") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(name, f"{name}: corrupt or unreadable image ({exc})") from None


def _opener(src: ImageSource) -> Tuple[str, Callable[[], BinaryIO]]:
    """(name for messages, a function opening a binary file for Image.open) for a path or
    encoded bytes. A path is opened as a regular file only: a FIFO named like an image would
    block the open forever, a device feed it endlessly."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>", lambda: io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        if os.path.isdir(name):
            raise DataError(f"{name}: is a folder, not an image file")
        return name, lambda: open(open_regular(name, os.O_RDONLY, follow=True), "rb")
    raise DataError(f"cannot read an image from {type(src).__name__}; give a path, bytes, PIL image "
                    "or uint8 array")


def _draft_and_check(img: Image.Image, name: str, size: Optional[Tuple[int, int]], limit: int) -> None:
    """Ask libjpeg for a reduced-scale decode when the image is far larger than ``size``, then
    refuse images above ``limit`` pixels. Only the header has been read so far: no pixel yet."""
    if size is not None and img.format == "JPEG":
        # draft() takes (width, height) and picks the largest 1/2^k scale that stays >= it.
        img.draft(img.mode, (DRAFT_MARGIN * size[1], DRAFT_MARGIN * size[0]))
    width, height = img.size
    if width * height > limit:
        raise ImageDecodeError(
            name,
            f"{name}: {width}x{height} is {_pixels(width * height, '.1f')} pixels, more than the "
            f"{_pixels(limit, 'g')} vehiclenet decodes (a decode takes about 7 bytes per pixel; JPEGs are "
            f"decoded at reduced scale, other formats cannot be); shrink the image first (the network sees "
            f"{INPUT_SIZE[1]}x{INPUT_SIZE[0]}), or raise {ENV_MAX_PIXELS} if the memory allows")


def _pixels(count: int, spec: str) -> str:
    """A pixel count as messages show it: in millions when it is one, else whole (never "0.0 million")."""
    return f"{count / 1e6:{spec}} million" if count >= 100_000 else f"{count:,}"


def preprocess(img: np.ndarray, size: Tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """RGB uint8 HWC array -> normalised (3, H, W) float32 at ``size`` = (height, width)."""
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        img = _array_to_rgb(np.asarray(img)) if isinstance(img, np.ndarray) else load_image(img, size)
    if min(img.shape[:2]) < 1:
        raise DataError(f"empty image (shape {img.shape})")
    resize, normalize, hwc2chw = _ops(tuple(int(s) for s in size))
    return hwc2chw(normalize(resize(img)))


def preprocess_image(src: ImageSource, size: Tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """``preprocess(load_image(src, size), size)``: any image source to the network's (3, H, W) float32 input."""
    return preprocess(load_image(src, size), size)

