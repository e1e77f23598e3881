"""Generated training data: identities that differ by colour, learnable in a few steps."""
from pathlib import Path

import numpy as np
from PIL import Image

TINY = dict(batch_size=6, image_size=64, lr=0.003, pretrained=False, num_workers=1, seed=0)


def make_dataset(root: Path, *, n_ids: int = 3, per_id: int = 8, size: int = 64, seed: int = 0,
                 veri: bool = False) -> Path:
    """Identities that differ by colour, so a network can learn them in a few steps."""
    rng = np.random.default_rng(seed)
    for i in range(n_ids):
        base = rng.integers(0, 256, 3)
        folder = root / "image_train" if veri else root / f"{i + 1:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_id):
            img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            name = f"{i + 1:04d}_c{j % 3 + 1:03d}_{j:08d}_0.jpg" if veri else f"{j}.jpg"
            Image.fromarray(img).save(folder / name)
    return root


def make_query_gallery(root: Path, *, seed: int = 3) -> Path:
    """A VeRi-style image_query/ + image_test/ split of 3 identities that differ by colour."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (3, 3))
    for split, cams in (("image_query", [1]), ("image_test", [2, 3])):
        (root / split).mkdir(parents=True)
        for vid, colour in enumerate(colours, 1):
            for cam in cams:
                img = np.clip(colour + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"{vid:04d}_c{cam:03d}_00000001_0.jpg")
    return root
