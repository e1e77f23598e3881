"""Training augmentations of the reference recipe, with the image size as a parameter.

Resize (bicubic) -> pad 15 -> RandomResizedCrop (scale 0.75-1, ratio 0.75-4/3,
bicubic) -> horizontal flip -> normalise (ImageNet mean/std on the 0-255 scale)
-> CHW float32 -> random erasing (p 0.5, area 0.02-0.4, aspect 0.3-3.3, fill 0).

Example::

    from vehiclenet.training.augment import train_transforms
    ops = train_transforms(image_size=256)
    dataset = dataset.map(ops, input_columns="image")   # a mindspore.dataset of HWC uint8 RGB

The evaluation pre-processing (no randomness) is ``vehiclenet.embedding.preprocessing``.
"""
from typing import List, Sequence, Tuple

from ..embedding.preprocessing import MEAN, STD

PAD = 15
CROP_SCALE = (0.75, 1.0)
CROP_RATIO = (0.75, 1.3333)
ERASE_PROB = 0.5
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 3.3)


def size_pair(image_size) -> Tuple[int, int]:
    """``384`` or ``(384, 384)`` -> (height, width), checked."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"image_size must be an int or (height, width) of at least 32, got {image_size!r}")
    return size


def train_transforms(image_size=384, *, pad: int = PAD, crop_scale: Sequence[float] = CROP_SCALE,
                     crop_ratio: Sequence[float] = CROP_RATIO, flip_prob: float = 0.5,
                     erase_prob: float = ERASE_PROB) -> List:
    """The reference training chain as a list of ``mindspore.dataset`` transforms.

    Input: HWC uint8 RGB arrays. Output: CHW float32 arrays of ``image_size``.
    """
    import mindspore.dataset.vision as vision
    from mindspore.dataset.vision import Inter

    size = size_pair(image_size)
    ops = [vision.Resize(size, Inter.BICUBIC)]
    if pad:
        ops.append(vision.Pad(pad))
    ops += [
        vision.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                 interpolation=Inter.BICUBIC),
        vision.RandomHorizontalFlip(flip_prob),
        vision.Normalize(MEAN, STD),
        vision.HWC2CHW(),
    ]
    if erase_prob > 0:
        # RandomErasing works on CHW arrays, so it comes after HWC2CHW (as in the reference, after ToTensor).
        ops.append(vision.RandomErasing(prob=erase_prob, scale=ERASE_AREA, ratio=ERASE_ASPECT, value=0))
    return ops

