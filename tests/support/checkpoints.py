"""Checkpoints in the published layout, generated on the fly."""
from pathlib import Path
from typing import List, Tuple

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"


def published_parameters() -> List[Tuple[str, Tuple[int, ...]]]:
    """The 273 (name, shape) pairs of the published checkpoint (copied from shared/spec)."""
    rows = (DATA / "checkpoint_parameters.tsv").read_text().splitlines()[1:]
    return [(name, tuple(int(d) for d in shape.split("x"))) for name, shape in (r.split("\t") for r in rows)]


def write_published_layout(path: Path, *, seed: int = 0, num_classes: int = 575, steps: int = 1000,
                           shapes=None) -> Path:
    """Write a checkpoint shaped like MindSpore's ModelCheckpoint output of the VeRi stage:
    network entries + accum.* / stat.* SGD state + learning_rate_group_0/1, momentum,
    global_step (607 entries for the 575-class head). Values are random but sane
    (positive variances, gamma near 1) so features stay finite."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    entries = []
    trainable = []
    for name, shape in shapes or published_parameters():
        if name.startswith("classifier.classifier."):
            shape = (num_classes,) + shape[1:]
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.0, shape)
        elif name.endswith(("moving_mean", "beta", "bias")):
            value = rng.normal(0.0, 0.05, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        entries.append({"name": name, "data": ms.Tensor(value.astype(np.float32))})
        if not name.endswith(("moving_mean", "moving_variance")):
            trainable.append((name, shape))
    for prefix in ("accum", "stat"):
        for name, shape in trainable:
            fill = np.ones(shape, np.float32) if prefix == "stat" else rng.normal(0, 1e-3, shape).astype(np.float32)
            entries.append({"name": f"{prefix}.{name}", "data": ms.Tensor(fill)})
    lr = np.linspace(0.02, 0.0002, steps, dtype=np.float32)
    entries.append({"name": "learning_rate_group_0", "data": ms.Tensor(lr * 0.1)})
    entries.append({"name": "learning_rate_group_1", "data": ms.Tensor(lr)})
    entries.append({"name": "momentum", "data": ms.Tensor(np.float32(0.9))})
    entries.append({"name": "global_step", "data": ms.Tensor(np.array([steps], np.int32))})
    ms.save_checkpoint(entries, str(path))
    return path
